# Vitis HLS 2022.2: C-simulate, synthesise and export ddi_engine as a Vivado IP for the ZedBoard.
#   cd fpga && vitis_hls -f vivado/hls.tcl
# Output: fpga/build/hls_ddi_engine/sol1/impl/ip (the IP repository vivado/overlay.tcl uses).
# NOT run in this repository's CI (no Xilinx tools there); see fpga/README.md.
set fpga_dir  [file normalize [file join [file dirname [info script]] ..]]
set hls_dir   [file join $fpga_dir hls]
set build_dir [file join $fpga_dir build]
set top       ddi_engine
set part      xc7z020clg484-1
# the PL clock, typed once (energy_models/engines/ddi_engine.yaml -> fpga/hls/regmap.h)
set regmap_h [file join $fpga_dir hls regmap.h]
if {![file exists $regmap_h]} { error "$regmap_h: file not found (python -m ddi_hw.deploy.regmap writes it)" }
set fh [open $regmap_h]
if {![regexp {#define DDI_CLOCK_MHZ ([0-9]+)} [read $fh] -> clock_mhz]} { error "regmap.h has no DDI_CLOCK_MHZ: python -m ddi_hw.deploy.regmap" }
close $fh

file mkdir $build_dir
cd $build_dir
open_project -reset hls_ddi_engine
set_top $top
add_files [file join $hls_dir ddi_engine.cpp] -cflags "-I$hls_dir -std=c++14"
add_files [file join $hls_dir ddi_engine.h]
add_files [file join $hls_dir regmap.h]
# the C test bench reads vectors written by `python -m ddi_hw.deploy.csim vectors fpga/build/vectors`
add_files -tb [file join $hls_dir tb_ddi_engine.cpp] -cflags "-I$hls_dir -std=c++14"

open_solution -reset sol1 -flow_target vivado
set_part $part
create_clock -period [expr {1000.0 / $clock_mhz}] -name default
# Zynq-7000 HP ports are 32-bit: 32-bit m_axi addresses keep the register map of regmap.yaml
config_interface -m_axi_addr64=false
config_export -format ip_catalog -rtl verilog -vendor ddi-hw -library hls -version 1.0 \
    -display_name "ddi_engine conv engine" -description "int16 conv engine with channel skipping"

if {[file exists [file join $build_dir vectors cases.txt]]} {
    csim_design -argv [file join $build_dir vectors]
}
csynth_design
export_design -format ip_catalog
exit
