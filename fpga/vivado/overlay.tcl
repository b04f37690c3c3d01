# Vivado 2022.2: ZedBoard block design = Zynq PS7 + ddi_engine (HLS IP) + AXI GPIO marker pin,
# implemented to a bitstream; copies the PYNQ overlay pair to fpga/overlay/ddi_engine.{bit,hwh}.
#   cd fpga && vivado -mode batch -source vivado/overlay.tcl     (after vivado/hls.tcl)
# Needs the ZedBoard board files (Vivado ships avnet.com:zedboard; Digilent's work too).
# NOT run in this repository's CI (no Xilinx tools there); see fpga/README.md.
set fpga_dir    [file normalize [file join [file dirname [info script]] ..]]
set build_dir   [file join $fpga_dir build]
set ip_repo     [file join $build_dir hls_ddi_engine sol1 impl ip]
set overlay_dir [file join $fpga_dir overlay]
set xdc         [file join $fpga_dir vivado zedboard_marker.xdc]
set part        xc7z020clg484-1
set bd          ddi_overlay
# the PL clock, typed once (energy_models/engines/ddi_engine.yaml -> fpga/hls/regmap.h)
set regmap_h [file join $fpga_dir hls regmap.h]
if {![file exists $regmap_h]} { error "$regmap_h: file not found (python -m ddi_hw.deploy.regmap writes it)" }
set fh [open $regmap_h]
if {![regexp {#define DDI_CLOCK_MHZ ([0-9]+)} [read $fh] -> clock_mhz]} { error "regmap.h has no DDI_CLOCK_MHZ: python -m ddi_hw.deploy.regmap" }
close $fh

if {![file isdirectory $ip_repo]} { error "no HLS IP at $ip_repo: run vitis_hls -f vivado/hls.tcl first" }
create_project -force ddi_overlay [file join $build_dir vivado] -part $part
set board [lindex [get_board_parts -quiet -latest_file_version {*zedboard*}] 0]
if {$board eq ""} { error "ZedBoard board files not installed (Vivado > Tools > Vivado Store > Boards)" }
set_property board_part $board [current_project]
set_property ip_repo_paths $ip_repo [current_project]
update_ip_catalog

create_bd_design $bd
# Zynq PS7 with the ZedBoard preset (DDR, MIO, clocks); FCLK0 = the engine clock; HP0 slave for the engine
set ps [create_bd_cell -type ip -vlnv xilinx.com:ip:processing_system7 ps7]
apply_bd_automation -rule xilinx.com:bd_rule:processing_system7 \
    -config {make_external "FIXED_IO, DDR" apply_board_preset "1" Master "Disable" Slave "Disable"} $ps
set_property -dict [list CONFIG.PCW_USE_S_AXI_HP0 {1} CONFIG.PCW_FPGA0_PERIPHERAL_FREQMHZ $clock_mhz] $ps

set eng  [create_bd_cell -type ip -vlnv ddi-hw:hls:ddi_engine:1.0 ddi_engine_0]
set gpio [create_bd_cell -type ip -vlnv xilinx.com:ip:axi_gpio marker_gpio]
set_property -dict [list CONFIG.C_GPIO_WIDTH {1} CONFIG.C_ALL_OUTPUTS {1}] $gpio

# control path: PS M_AXI_GP0 -> AXI interconnect -> engine s_axi_control, GPIO
apply_bd_automation -rule xilinx.com:bd_rule:axi4 -config {Master "/ps7/M_AXI_GP0" Clk "Auto"} \
    [get_bd_intf_pins ddi_engine_0/s_axi_control]
apply_bd_automation -rule xilinx.com:bd_rule:axi4 -config {Master "/ps7/M_AXI_GP0" Clk "Auto"} \
    [get_bd_intf_pins marker_gpio/S_AXI]
# data path: engine m_axi_gmem0/1/2 -> one SmartConnect -> PS S_AXI_HP0 (DDR). Automation only applies
# to an unconnected interface: S_AXI_HP0 is connected after the first call, so target each master.
set first 1
foreach m {m_axi_gmem0 m_axi_gmem1 m_axi_gmem2} {
    set intc [expr {$first ? "New AXI SmartConnect" : "/axi_smc"}]
    apply_bd_automation -rule xilinx.com:bd_rule:axi4 -config [list Clk_master {Auto} Clk_slave {Auto} \
        Clk_xbar {Auto} Master "/ddi_engine_0/$m" Slave {/ps7/S_AXI_HP0} ddr_seg {Auto} intc_ip $intc \
        master_apm {0}] [get_bd_intf_pins ddi_engine_0/$m]
    set first 0
}
# measurement marker: GPIO bit 0 -> PMOD JA1 (constraints in zedboard_marker.xdc)
create_bd_intf_port -mode Master -vlnv xilinx.com:interface:gpio_rtl:1.0 marker
connect_bd_intf_net [get_bd_intf_pins marker_gpio/GPIO] [get_bd_intf_ports marker]

assign_bd_address
validate_bd_design
save_bd_design
make_wrapper -files [get_files $bd.bd] -top -import
add_files -fileset constrs_1 -norecurse $xdc

launch_runs impl_1 -to_step write_bitstream -jobs 4
wait_on_run impl_1
if {[get_property PROGRESS [get_runs impl_1]] ne "100%"} { error "implementation failed" }

file mkdir $overlay_dir
set bit [lindex [glob [file join $build_dir vivado ddi_overlay.runs impl_1 *.bit]] 0]
set hwh [lindex [glob [file join $build_dir vivado ddi_overlay.gen sources_1 bd $bd hw_handoff $bd.hwh]] 0]
# PYNQ wants the .bit and .hwh side by side with the same base name
file copy -force $bit [file join $overlay_dir ddi_engine.bit]
file copy -force $hwh [file join $overlay_dir ddi_engine.hwh]
puts "overlay written to $overlay_dir/ddi_engine.bit and ddi_engine.hwh"
