# Measurement marker: AXI GPIO bit 0 on PMOD JA pin 1 (package pin Y11, 3.3 V bank).
set_property PACKAGE_PIN Y11 [get_ports {marker_tri_o[0]}]
set_property IOSTANDARD LVCMOS33 [get_ports {marker_tri_o[0]}]
