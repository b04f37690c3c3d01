# Dry run of the Vitis HLS / Vivado scripts in plain tclsh 8.6, without any Xilinx tool.
#
#   tclsh fpga/vivado/dryrun.tcl [-part P] [-overlay BIT] SCRIPT...      (JSON call log on stdout)
#   tclsh fpga/vivado/dryrun.tcl fpga/vivado/hls.tcl fpga/vivado/overlay.tcl
#
# Why: the real tools are not available here, so a typo in a cell name, a missing source file or a
# wrong part would only show up hours into a real build. Every tool command the scripts use is a
# stub here that records the call and checks what can be checked without the tool: files exist, the
# part, the HLS top function and its INTERFACE pragmas, a small model of the block design (cells,
# their interfaces, connections, clocks), the XDC pins against the wrapper's ports and the ZedBoard
# PMOD pins, and where the .bit/.hwh pair is copied. Nothing is written to disk: mkdir, copy and the
# tools' outputs live in a virtual file system. It proves the scripts are self-consistent, NOT that
# Vivado accepts them, that the design synthesises or that timing closes.
#
# Scripts run in the order given and share the virtual file system and IP catalog, so run hls.tcl
# before overlay.tcl (overlay.tcl alone stops at its own "no HLS IP" check). A script is run with the
# Vitis HLS stubs if its name starts with "hls", else with the Vivado stubs; prefix "vitis_hls:" or
# "vivado:" to choose. Exit status 0 = consistent, 1 = a check failed (message on stderr and in the
# JSON "error"), 2 = bad usage. Options are matched exactly (Vivado also accepts abbreviations).

namespace eval ::dry {
    variable part xc7z020clg484-1      ;# ZedBoard (ddi_hw/deploy/regmap.yaml `part`)
    variable overlay_bit ""            ;# where ddi_hw/deploy/board.py looks; default <script dir>/../overlay
    variable tool ""
    variable script ""
    variable calls {}
    variable outputs {}                ;# lines the scripts printed with puts
    variable vfs [dict create]         ;# normalized path -> {kind dir|file origin TEXT meta DICT}
    variable cwd [pwd]
    variable hls [dict create]         ;# Vitis HLS project state
    variable viv [dict create]         ;# Vivado project state
    variable catalog [dict create]     ;# vlnv -> {kind K meta DICT}
    variable cells [dict create]       ;# bd cell name -> {vlnv K kind K config DICT intf DICT pins DICT}
    variable ports [dict create]       ;# bd interface ports: name -> {mode M type T}
    variable nets {}                   ;# interface connections: list of {a b}
    variable clocked [dict create]     ;# /cell/pin -> driving clock or reset source
    variable addresses {}              ;# {master slave} pairs from assign_bd_address
    variable xdc_ports [dict create]   ;# top port -> {PACKAGE_PIN .. IOSTANDARD ..}
    variable copies {}
    variable checks {}                 ;# names of the end-of-run checks that passed
    variable fail_line ""              ;# script line of the last failed check

    # ZedBoard Rev D PMOD pins (Avnet ZedBoard master XDC): all in bank 13, VCCO fixed at 3.3 V.
    variable pmod_pins [dict create \
        Y11 JA1 AA11 JA2 Y10 JA3 AA9 JA4 AB11 JA7 AB10 JA8 AB9 JA9 AA8 JA10 \
        W12 JB1 W11 JB2 V10 JB3 W8 JB4 V12 JB7 W10 JB8 V9 JB9 V8 JB10 \
        AB7 JC1_P AB6 JC1_N Y4 JC2_P AA4 JC2_N R6 JC3_P T6 JC3_N T4 JC4_P U4 JC4_N \
        V7 JD1_P W7 JD1_N V5 JD2_P V4 JD2_N W6 JD3_P W5 JD3_N U6 JD4_P U5 JD4_N]
    variable board_parts {avnet.com:zedboard:part0:1.4 digilentinc.com:zedboard:part0:1.0}
    variable aximm xilinx.com:interface:aximm_rtl:1.0
}

# ---------------------------------------------------------------- recording and failing
proc ::dry::fail {msg} {
    set ::dry::fail_line [caller_line]
    error $msg {} {DRYRUN FAIL}
}

proc ::dry::caller_line {} {
    # line of the script command that led here (TIP 280 frame info), "" outside the scripts
    for {set i [expr {[info frame] - 1}]} {$i > 0} {incr i -1} {
        set f [info frame $i]
        if {[dict exists $f file] && [dict get $f file] eq $::dry::script} { return [dict get $f line] }
    }
    return ""
}

proc ::dry::rec {cmd argv} {
    lappend ::dry::calls [dict create tool $::dry::tool script [file tail $::dry::script] \
        line [caller_line] cmd $cmd args $argv]
}

# Parse OPTIONS (dict option -> number of values, 0 or 1) out of ARGV; anything else starting with
# "-" is an unknown option. With EQ, "-opt=value" is accepted too (Vitis HLS config_* syntax).
proc ::dry::parse {cmd argv spec {eq 0}} {
    set opts [dict create]
    set pos {}
    for {set i 0} {$i < [llength $argv]} {incr i} {
        set a [lindex $argv $i]
        if {$eq && [regexp {^(-[\w]+)=(.*)$} $a -> name val] && [dict exists $spec $name]} {
            dict set opts $name $val
            continue
        }
        if {[string match -* $a] && ![string is double -strict $a]} {
            if {![dict exists $spec $a]} {
                fail "$cmd: unknown option '$a' (known: [lsort [dict keys $spec]])"
            }
            if {[dict get $spec $a] == 0} {
                dict set opts $a 1
            } else {
                if {$i + 1 >= [llength $argv]} { fail "$cmd: option $a needs a value" }
                dict set opts $a [lindex $argv [incr i]]
            }
            continue
        }
        lappend pos $a
    }
    return [list $opts $pos]
}

proc ::dry::need_pos {cmd pos n what} {
    if {[llength $pos] != $n} { fail "$cmd: expected $what, got [llength $pos] argument(s): $pos" }
}

# ---------------------------------------------------------------- virtual file system
proc ::dry::abs {p} {
    if {[::dry::_file pathtype $p] ne "absolute"} { set p [::dry::_file join $::dry::cwd $p] }
    return [::dry::_file normalize $p]
}

proc ::dry::vfs_add {path kind {origin ""} {meta {}}} {
    set path [abs $path]
    set d [::dry::_file dirname $path]
    while {$d ne [::dry::_file dirname $d] && ![is_dir $d]} {
        dict set ::dry::vfs $d [dict create kind dir origin "" meta {}]
        set d [::dry::_file dirname $d]
    }
    dict set ::dry::vfs $path [dict create kind $kind origin $origin meta $meta]
}

proc ::dry::is_dir {p} {
    set p [abs $p]
    if {[dict exists $::dry::vfs $p]} { return [expr {[dict get $::dry::vfs $p kind] eq "dir"}] }
    return [::dry::_file isdirectory $p]
}

proc ::dry::is_file {p} {
    set p [abs $p]
    if {[dict exists $::dry::vfs $p]} { return [expr {[dict get $::dry::vfs $p kind] eq "file"}] }
    return [::dry::_file isfile $p]
}

proc ::dry::exists {p} { expr {[is_dir $p] || [is_file $p]} }

proc ::dry::need_file {cmd p} {
    if {![is_file $p]} { fail "$cmd: file not found: $p" }
    return [abs $p]
}

rename ::file ::dry::_file
proc ::file {sub args} {
    switch -- $sub {
        mkdir {
            ::dry::rec "file mkdir" $args
            foreach d $args {
                if {[::dry::is_file $d]} { ::dry::fail "file mkdir: $d is a file" }
                ::dry::vfs_add $d dir
            }
            return
        }
        copy {
            ::dry::rec "file copy" $args
            lassign [::dry::parse "file copy" $args {-force 0 -- 0}] opts pos
            ::dry::need_pos "file copy" $pos 2 "SOURCE TARGET"
            lassign $pos src dst
            if {![::dry::exists $src]} { ::dry::fail "file copy: source does not exist: $src" }
            if {[::dry::is_dir $dst]} { set dst [::dry::_file join $dst [::dry::_file tail $src]] }
            if {![::dry::is_dir [::dry::_file dirname [::dry::abs $dst]]]} {
                ::dry::fail "file copy: target directory does not exist: [::dry::_file dirname $dst]"
            }
            if {[::dry::exists $dst] && ![dict exists $opts -force]} { ::dry::fail "file copy: $dst exists (no -force)" }
            ::dry::vfs_add $dst file [::dry::abs $src]
            lappend ::dry::copies [list [::dry::abs $src] [::dry::abs $dst]]
            return
        }
        delete {
            ::dry::rec "file delete" $args
            foreach p $args { if {![string match -* $p]} { dict unset ::dry::vfs [::dry::abs $p] } }
            return
        }
        exists - readable { return [::dry::exists [lindex $args 0]] }
        isdirectory       { return [::dry::is_dir [lindex $args 0]] }
        isfile            { return [::dry::is_file [lindex $args 0]] }
        join - normalize - dirname - tail - rootname - extension - split - pathtype - nativename -
        separator {
            return [::dry::_file $sub {*}$args]
        }
        default { ::dry::fail "file $sub: not modelled by dryrun.tcl (it would touch the disk)" }
    }
}

proc ::dry::glob_match {pattern path} {
    set pp [::dry::_file split $pattern]
    set pa [::dry::_file split $path]
    if {[llength $pp] != [llength $pa]} { return 0 }
    foreach a $pp b $pa { if {![string match $a $b]} { return 0 } }
    return 1
}

rename ::glob ::dry::_glob
proc ::glob {args} {
    ::dry::rec glob $args
    lassign [::dry::parse glob $args {-nocomplain 0 -types 1 -directory 1 -- 0}] opts pos
    if {[dict exists $opts -directory]} {
        set pos [lmap p $pos { ::dry::_file join [dict get $opts -directory] $p }]
    }
    set hits {}
    foreach p $pos {
        set p [::dry::abs $p]
        dict for {path e} $::dry::vfs { if {[::dry::glob_match $p $path]} { lappend hits $path } }
        catch { lappend hits {*}[::dry::_glob -nocomplain -- $p] }
    }
    if {[dict exists $opts -types]} {
        set t [dict get $opts -types]
        set hits [lmap h $hits { expr {($t eq "f" && [::dry::is_file $h]) || ($t eq "d" && [::dry::is_dir $h]) ? $h : [continue]} }]
    }
    set hits [lsort -unique $hits]
    if {$hits eq {} && ![dict exists $opts -nocomplain]} {
        ::dry::fail "glob: no files matched glob pattern \"[join $pos]\" (not produced by an earlier step)"
    }
    return $hits
}

rename ::cd ::dry::_cd
proc ::cd {{dir ~}} {
    ::dry::rec cd [list $dir]
    if {![::dry::is_dir $dir]} { ::dry::fail "cd: no such directory: $dir" }
    set ::dry::cwd [::dry::abs $dir]
}

rename ::pwd ::dry::_pwd
proc ::pwd {} { return $::dry::cwd }

rename ::puts ::dry::_puts
proc ::puts {args} {
    # script output goes to stderr so that stdout stays pure JSON
    if {[llength $args] == 1 || ([llength $args] == 2 && [lindex $args 0] eq "-nonewline")} {
        lappend ::dry::outputs [lindex $args end]
        ::dry::_puts stderr [lindex $args end]
        return
    }
    ::dry::_puts {*}$args
}

rename ::open ::dry::_open
proc ::open {name {access r} args} {
    if {![regexp {^r$|^RDONLY$} $access]} { ::dry::fail "open $name $access: writing files is not modelled" }
    return [::dry::_open $name $access {*}$args]
}

rename ::exit ::dry::_exit
proc ::exit {{code 0}} {
    ::dry::rec exit [list $code]
    error "exit $code" {} [list DRYRUN EXIT $code]
}

# ---------------------------------------------------------------- Vitis HLS stubs
proc ::dry::hls_need {key cmd what} {
    if {![dict exists $::dry::hls $key]} { fail "$cmd: $what first" }
    return [dict get $::dry::hls $key]
}

proc ::open_project {args} {
    ::dry::rec open_project $args
    lassign [::dry::parse open_project $args {-reset 0 -upgrade 0}] opts pos
    ::dry::need_pos open_project $pos 1 "a project name"
    set dir [::dry::abs [lindex $pos 0]]
    ::dry::vfs_add $dir dir
    set ::dry::hls [dict create project [lindex $pos 0] dir $dir files {} tb_files {}]
}

proc ::set_top {args} {
    ::dry::rec set_top $args
    ::dry::hls_need dir set_top "open_project"
    lassign [::dry::parse set_top $args {}] opts pos
    ::dry::need_pos set_top $pos 1 "a function name"
    dict set ::dry::hls top [lindex $pos 0]
}

proc ::dry::hls_add_files {argv} {
    hls_need dir add_files "open_project"
    lassign [parse add_files $argv {-blackbox 1 -cflags 1 -csimflags 1 -tb 0}] opts pos
    if {$pos eq {}} { fail "add_files: no file given" }
    foreach flags {-cflags -csimflags} {
        if {[dict exists $opts $flags]} {
            foreach inc [regexp -all -inline {\-I\s*(\S+)} [dict get $opts $flags]] {
                if {[string match -I* $inc]} continue
                if {![is_dir $inc]} { fail "add_files: include directory in $flags does not exist: $inc" }
            }
        }
    }
    set key [expr {[dict exists $opts -tb] ? "tb_files" : "files"}]
    foreach f $pos { dict lappend ::dry::hls $key [need_file add_files $f] }
}

proc ::open_solution {args} {
    ::dry::rec open_solution $args
    ::dry::hls_need dir open_solution "open_project"
    lassign [::dry::parse open_solution $args {-reset 0 -flow_target 1}] opts pos
    ::dry::need_pos open_solution $pos 1 "a solution name"
    set flow [expr {[dict exists $opts -flow_target] ? [dict get $opts -flow_target] : "vivado"}]
    if {$flow ni {vivado vitis}} { ::dry::fail "open_solution: -flow_target must be vivado or vitis, got '$flow'" }
    dict set ::dry::hls solution [lindex $pos 0]
    dict set ::dry::hls flow $flow
}

proc ::dry::check_part {cmd p} {
    if {$p ne $::dry::part} { fail "$cmd: part '$p' is not $::dry::part (the ZedBoard's Zynq, ddi_hw/deploy/regmap.yaml)" }
}

proc ::set_part {args} {
    ::dry::rec set_part $args
    ::dry::hls_need solution set_part "open_solution"
    lassign [::dry::parse set_part $args {-tool 1}] opts pos
    ::dry::need_pos set_part $pos 1 "a part name"
    ::dry::check_part set_part [lindex $pos 0]
    dict set ::dry::hls part [lindex $pos 0]
}

proc ::dry::hls_create_clock {argv} {
    hls_need solution create_clock "open_solution"
    lassign [parse create_clock $argv {-period 1 -name 1}] opts pos
    if {$pos ne {}} { fail "create_clock: unexpected argument(s) $pos" }
    if {![dict exists $opts -period]} { fail "create_clock: -period is required" }
    set p [dict get $opts -period]
    if {[regexp {^([0-9.]+)MHz$} $p -> mhz]} { set p [expr {1000.0 / $mhz}] }
    if {![string is double -strict $p] || $p <= 0} { fail "create_clock: bad -period '$p'" }
    dict set ::dry::hls clock_ns $p
}

proc ::config_interface {args} {
    ::dry::rec config_interface $args
    ::dry::hls_need solution config_interface "open_solution"
    set bools {-clock_enable -m_axi_addr64 -m_axi_auto_id_channel -m_axi_auto_max_ports
        -m_axi_conservative_mode -m_axi_flush_mode -register_all_io -s_axilite_data64
        -s_axilite_mailbox -s_axilite_status_regs -s_axilite_sw_reset -s_axilite_auto_restart_counter}
    set vals {-default_slave_interface -m_axi_alignment_byte_size -m_axi_buffer_impl
        -m_axi_cache_impl -m_axi_latency -m_axi_max_bitwidth -m_axi_max_read_burst_length
        -m_axi_max_widen_bitwidth -m_axi_max_write_burst_length -m_axi_min_bitwidth
        -m_axi_num_read_outstanding -m_axi_num_write_outstanding -m_axi_offset
        -register_reset_num -s_axilite_interrupt_mode}
    set spec [dict create]
    foreach b $bools { dict set spec $b 0 }
    foreach v $vals { dict set spec $v 1 }
    lassign [::dry::parse config_interface $args $spec 1] opts pos
    if {$pos ne {}} { ::dry::fail "config_interface: unexpected argument(s) $pos" }
    dict for {k v} $opts {
        if {$k in $bools && $v ni {1 0 true false}} { ::dry::fail "config_interface: $k=$v is not a boolean" }
    }
    dict set ::dry::hls interface $opts
}

proc ::config_export {args} {
    ::dry::rec config_export $args
    ::dry::hls_need solution config_export "open_solution"
    set spec [dict create]
    foreach o {-description -display_name -format -ipname -library -output -rtl -taxonomy -vendor
               -version -vivado_clock -vivado_impl_strategy -vivado_max_timing_paths
               -vivado_optimization_level -vivado_phys_opt -vivado_report_level
               -vivado_synth_design_args -vivado_synth_strategy} { dict set spec $o 1 }
    lassign [::dry::parse config_export $args $spec 1] opts pos
    if {$pos ne {}} { ::dry::fail "config_export: unexpected argument(s) $pos" }
    ::dry::check_export_opts config_export $opts
    dict set ::dry::hls export $opts
}

proc ::dry::check_export_opts {cmd opts} {
    if {[dict exists $opts -format] && [dict get $opts -format] ni {ip_catalog xo syn_dcp sysgen}} {
        fail "$cmd: -format must be ip_catalog, xo, syn_dcp or sysgen"
    }
    if {[dict exists $opts -rtl] && [dict get $opts -rtl] ni {verilog vhdl}} { fail "$cmd: -rtl must be verilog or vhdl" }
    if {[dict exists $opts -version] && ![regexp {^\d+\.\d+$} [dict get $opts -version]]} {
        fail "$cmd: -version must look like 1.0, got '[dict get $opts -version]'"
    }
    foreach o {-vendor -library} {
        if {[dict exists $opts $o] && ![regexp {^[A-Za-z0-9_.-]+$} [dict get $opts $o]]} {
            fail "$cmd: $o '[dict get $opts $o]' is not a valid VLNV field"
        }
    }
}

proc ::csim_design {args} {
    ::dry::rec csim_design $args
    ::dry::hls_need solution csim_design "open_solution"
    lassign [::dry::parse csim_design $args {-argv 1 -clean 0 -O 0 -ldflags 1 -mflags 1 -profile 0 -setup 0}] opts pos
    if {[dict get $::dry::hls tb_files] eq {}} { ::dry::fail "csim_design: no test bench (add_files -tb)" }
    dict set ::dry::hls csim 1
}

# The top function's source text and its INTERFACE pragmas -> the exported IP's interfaces.
proc ::dry::hls_top_interfaces {cmd} {
    set top [hls_need top $cmd "set_top"]
    set found ""
    set text ""
    foreach f [dict get $::dry::hls files] {
        set fh [::dry::_open $f r]
        set src [read $fh]
        close $fh
        append text $src\n
        set ob [format %c 123]
        if {[regexp "\\m${top}\\s*\\(\[^;$ob\]*\\)\\s*\[$ob\]" $src]} { set found $f }
    }
    if {$found eq ""} {
        fail "$cmd: top function '$top' (set_top) is not defined in the design files: [dict get $::dry::hls files]"
    }
    set intf [dict create]
    set irq 0
    foreach {line body} [regexp -all -inline -line {^\s*#pragma\s+HLS\s+INTERFACE\s+(.*)$} $text] {
        set kv [dict create]
        foreach tok $body {
            if {[regexp {^(\w+)=(.*)$} $tok -> k v]} { dict set kv [string tolower $k] $v } else { dict set kv mode $tok }
        }
        if {![dict exists $kv mode]} continue
        set mode [dict get $kv mode]
        set port [expr {[dict exists $kv port] ? [dict get $kv port] : ""}]
        switch -- $mode {
            m_axi {
                set b [expr {[dict exists $kv bundle] ? [dict get $kv bundle] : "gmem"}]
                dict set intf m_axi_$b [dict create mode Master type $::dry::aximm]
            }
            s_axilite {
                set b [expr {[dict exists $kv bundle] ? [dict get $kv bundle] : "control"}]
                dict set intf s_axi_$b [dict create mode Slave type $::dry::aximm]
                if {$port eq "return"} { set irq 1 }
            }
            axis {
                dict set intf $port [dict create mode [expr {[string match *out* $port] ? "Master" : "Slave"}] \
                    type xilinx.com:interface:axis_rtl:1.0]
            }
        }
    }
    return [dict create file $found interfaces $intf interrupt $irq]
}

proc ::csynth_design {args} {
    ::dry::rec csynth_design $args
    ::dry::hls_need solution csynth_design "open_solution"
    lassign [::dry::parse csynth_design $args {-dump_cfg 0 -dump_post_cfg 0 -synthesis_check 0}] opts pos
    ::dry::hls_need part csynth_design "set_part"
    ::dry::hls_need clock_ns csynth_design "create_clock"
    set info [::dry::hls_top_interfaces csynth_design]
    if {[dict get $info interfaces] eq {}} { ::dry::fail "csynth_design: top function has no INTERFACE pragmas" }
    dict set ::dry::hls synth $info
}

proc ::export_design {args} {
    ::dry::rec export_design $args
    set info [::dry::hls_need synth export_design "csynth_design"]
    set spec [dict create]
    foreach o {-description -display_name -flow -format -ipname -library -output -rtl -taxonomy
               -vendor -version} { dict set spec $o 1 }
    lassign [::dry::parse export_design $args $spec] opts pos
    if {$pos ne {}} { ::dry::fail "export_design: unexpected argument(s) $pos" }
    set cfg [expr {[dict exists $::dry::hls export] ? [dict get $::dry::hls export] : {}}]
    set opts [dict merge $cfg $opts]
    ::dry::check_export_opts export_design $opts
    set fmt [expr {[dict exists $opts -format] ? [dict get $opts -format] : "ip_catalog"}]
    if {$fmt ne "ip_catalog"} { ::dry::fail "export_design: format $fmt is not an IP for the Vivado block design" }
    set top [dict get $::dry::hls top]
    set vendor [expr {[dict exists $opts -vendor] ? [dict get $opts -vendor] : "xilinx.com"}]
    set lib [expr {[dict exists $opts -library] ? [dict get $opts -library] : "hls"}]
    set name [expr {[dict exists $opts -ipname] ? [dict get $opts -ipname] : $top}]
    set ver [expr {[dict exists $opts -version] ? [dict get $opts -version] : "1.0"}]
    set vlnv $vendor:$lib:$name:$ver
    set ipdir [file join [dict get $::dry::hls dir] [dict get $::dry::hls solution] impl ip]
    set meta [dict create vlnv $vlnv interfaces [dict get $info interfaces] interrupt [dict get $info interrupt] \
        clock_ns [dict get $::dry::hls clock_ns] part [dict get $::dry::hls part]]
    ::dry::vfs_add [file join $ipdir component.xml] file export_design $meta
    dict set ::dry::hls ip [dict create vlnv $vlnv dir [::dry::abs $ipdir] interfaces [dict get $info interfaces]]
}

foreach cmd {close_project close_solution cosim_design config_compile config_rtl config_dataflow
             set_directive_interface} {
    proc ::$cmd {args} "::dry::rec $cmd \$args"
}

# ---------------------------------------------------------------- Vivado project stubs
proc ::dry::viv_need {key cmd what} {
    if {![dict exists $::dry::viv $key]} { fail "$cmd: $what first" }
    return [dict get $::dry::viv $key]
}

proc ::create_project {args} {
    ::dry::rec create_project $args
    lassign [::dry::parse create_project $args {-part 1 -force 0 -in_memory 0 -ip 0 -quiet 0 -verbose 0}] opts pos
    if {[llength $pos] < 1 || [llength $pos] > 2} { ::dry::fail "create_project: expected NAME ?DIR?, got $pos" }
    lassign $pos name dir
    if {$dir eq ""} { set dir $name }
    if {![dict exists $opts -part]} { ::dry::fail "create_project: no -part (the ZedBoard needs $::dry::part)" }
    ::dry::check_part create_project [dict get $opts -part]
    set dir [::dry::abs $dir]
    if {[::dry::exists [file join $dir $name.xpr]] && ![dict exists $opts -force]} {
        ::dry::fail "create_project: project exists at $dir (use -force)"
    }
    ::dry::vfs_add [file join $dir $name.xpr] file create_project
    set ::dry::viv [dict create project $name dir $dir part [dict get $opts -part] props {} \
        files [dict create sources_1 {} constrs_1 {}] runs {}]
    return $name
}

proc ::current_project {args} {
    ::dry::rec current_project $args
    lassign [::dry::parse current_project $args {-quiet 0 -verbose 0}] opts pos
    return [::dry::viv_need project current_project "create_project"]
}

proc ::get_board_parts {args} {
    ::dry::rec get_board_parts $args
    lassign [::dry::parse get_board_parts $args {-quiet 0 -verbose 0 -latest_file_version 0
        -latest_hw_revision 0 -regexp 0 -nocase 0 -filter 1 -of_objects 1}] opts pos
    set hits {}
    foreach bp $::dry::board_parts {
        foreach p $pos { if {[string match -nocase $p $bp]} { lappend hits $bp } }
    }
    if {[dict exists $opts -latest_file_version]} { set hits [lrange $hits 0 0] }
    return $hits
}

proc ::update_ip_catalog {args} {
    ::dry::rec update_ip_catalog $args
    lassign [::dry::parse update_ip_catalog $args {-rebuild 0 -quiet 0 -verbose 0 -repo_path 1 -add_ip 1}] opts pos
    ::dry::viv_need project update_ip_catalog "create_project"
    set repos [expr {[dict exists $::dry::viv props ip_repo_paths] ? [dict get $::dry::viv props ip_repo_paths] : {}}]
    foreach repo $repos {
        dict for {path e} $::dry::vfs {
            if {[file tail $path] eq "component.xml" && [string first [::dry::abs $repo]/ $path] == 0
                && [dict exists [dict get $e meta] vlnv]} {
                set meta [dict get $e meta]
                dict set ::dry::catalog [dict get $meta vlnv] [dict create kind hls meta $meta]
            }
        }
    }
}

proc ::dry::builtin_catalog {} {
    foreach {vlnv kind} {xilinx.com:ip:processing_system7:5.5 ps7 xilinx.com:ip:axi_gpio:2.0 gpio
                         xilinx.com:ip:smartconnect:1.0 smartconnect xilinx.com:ip:axi_interconnect:2.1 interconnect
                         xilinx.com:ip:proc_sys_reset:5.0 reset} {
        dict set ::dry::catalog $vlnv [dict create kind $kind meta {}]
    }
}

proc ::dry::set_project_prop {name value} {
    switch -- [string tolower $name] {
        board_part {
            if {$value ni $::dry::board_parts} { fail "set_property board_part: unknown board part '$value'" }
            # both ZedBoard board parts are the xc7z020clg484-1
            if {[dict get $::dry::viv part] ne "xc7z020clg484-1"} { fail "set_property board_part: $value does not match the project part" }
            dict set ::dry::viv props board_part $value
        }
        ip_repo_paths {
            foreach r $value { if {![is_dir $r]} { fail "set_property ip_repo_paths: no such directory: $r" } }
            dict set ::dry::viv props ip_repo_paths [lmap r $value { abs $r }]
        }
        default { dict set ::dry::viv props [string tolower $name] $value }
    }
}

# ---------------------------------------------------------------- block design model
proc ::create_bd_design {args} {
    ::dry::rec create_bd_design $args
    lassign [::dry::parse create_bd_design $args {-dir 1 -cell 1 -mode 1 -quiet 0 -verbose 0}] opts pos
    ::dry::need_pos create_bd_design $pos 1 "a design name"
    ::dry::viv_need project create_bd_design "create_project"
    set bd [lindex $pos 0]
    set bdfile [file join [dict get $::dry::viv dir] [dict get $::dry::viv project].srcs sources_1 bd $bd $bd.bd]
    ::dry::vfs_add $bdfile file create_bd_design
    dict set ::dry::viv bd $bd
    dict set ::dry::viv bdfile [::dry::abs $bdfile]
    dict with ::dry::viv { dict lappend files sources_1 [::dry::abs $bdfile] }
    return $bd
}

proc ::dry::cfg {cell key default} {
    set c [dict get $::dry::cells $cell config]
    if {[dict exists $c $key]} { return [dict get $c $key] }
    return $default
}

# Interfaces and pins of one cell, from its IP kind and CONFIG (the parts of each IP modelled here).
proc ::dry::refresh_cell {cell} {
    set kind [dict get $::dry::cells $cell kind]
    set intf [dict create]
    set pins [dict create]
    set A $::dry::aximm
    switch -- $kind {
        ps7 {
            dict set intf DDR [dict create mode Master type xilinx.com:interface:ddrx_rtl:1.0]
            dict set intf FIXED_IO [dict create mode Master type xilinx.com:display_processing_system7:fixedio_rtl:1.0]
            dict set pins FCLK_CLK0 [dict create dir O type clk]
            dict set pins FCLK_RESET0_N [dict create dir O type rst]
            foreach m {GP0 GP1} {
                if {[cfg $cell CONFIG.PCW_USE_M_AXI_$m [expr {$m eq "GP0"}]]} {
                    dict set intf M_AXI_$m [dict create mode Master type $A]
                    dict set pins M_AXI_${m}_ACLK [dict create dir I type clk]
                }
            }
            foreach s {HP0 HP1 HP2 HP3 GP0 GP1 ACP} {
                if {[cfg $cell CONFIG.PCW_USE_S_AXI_$s 0]} {
                    dict set intf S_AXI_$s [dict create mode Slave type $A]
                    dict set pins S_AXI_${s}_ACLK [dict create dir I type clk]
                }
            }
        }
        gpio {
            dict set intf S_AXI [dict create mode Slave type $A]
            dict set intf GPIO [dict create mode Master type xilinx.com:interface:gpio_rtl:1.0]
            if {[cfg $cell CONFIG.C_IS_DUAL 0]} { dict set intf GPIO2 [dict create mode Master type xilinx.com:interface:gpio_rtl:1.0] }
            dict set pins s_axi_aclk [dict create dir I type clk]
            dict set pins s_axi_aresetn [dict create dir I type rst]
        }
        hls {
            set meta [dict get $::dry::catalog [dict get $::dry::cells $cell vlnv] meta]
            set intf [dict get $meta interfaces]
            dict set pins ap_clk [dict create dir I type clk]
            dict set pins ap_rst_n [dict create dir I type rst]
            if {[dict get $meta interrupt]} { dict set pins interrupt [dict create dir O type intr] }
        }
        smartconnect - interconnect {
            set si [cfg $cell CONFIG.NUM_SI 1]
            set mi [cfg $cell CONFIG.NUM_MI 1]
            set pre [expr {$kind eq "smartconnect" ? "" : "S"}]
            for {set i 0} {$i < $si} {incr i} { dict set intf [format S%02d_AXI $i] [dict create mode Slave type $A] }
            for {set i 0} {$i < $mi} {incr i} { dict set intf [format M%02d_AXI $i] [dict create mode Master type $A] }
            dict set pins aclk [dict create dir I type clk]
            dict set pins aresetn [dict create dir I type rst]
        }
        reset {
            dict set pins slowest_sync_clk [dict create dir I type clk]
            dict set pins ext_reset_in [dict create dir I type rst]
            dict set pins peripheral_aresetn [dict create dir O type rst]
        }
    }
    foreach n $::dry::nets {
        foreach end $n {
            if {[string match /$cell/* $end] && ![dict exists $intf [lindex [split $end /] 2]]} {
                fail "set_property: interface $end is connected but the new CONFIG removes it"
            }
        }
    }
    dict set ::dry::cells $cell intf $intf
    dict set ::dry::cells $cell pins $pins
}

proc ::dry::resolve_vlnv {cmd vlnv} {
    if {[dict exists $::dry::catalog $vlnv]} { return $vlnv }
    set hits [lsearch -all -inline -glob [dict keys $::dry::catalog] $vlnv:*]
    if {[llength $hits] == 1} { return [lindex $hits 0] }
    fail "$cmd: IP '$vlnv' is not in the IP catalog (known: [lsort [dict keys $::dry::catalog]])"
}

proc ::dry::new_cell {cmd vlnv name} {
    if {[dict exists $::dry::cells $name]} { fail "$cmd: a cell named '$name' already exists" }
    if {![regexp {^[A-Za-z][A-Za-z0-9_]*$} $name]} { fail "$cmd: bad cell name '$name'" }
    set vlnv [resolve_vlnv $cmd $vlnv]
    dict set ::dry::cells $name [dict create vlnv $vlnv kind [dict get $::dry::catalog $vlnv kind] config {}]
    refresh_cell $name
    return /$name
}

proc ::create_bd_cell {args} {
    ::dry::rec create_bd_cell $args
    lassign [::dry::parse create_bd_cell $args {-type 1 -vlnv 1 -reference 1 -quiet 0 -verbose 0}] opts pos
    ::dry::need_pos create_bd_cell $pos 1 "a cell name"
    ::dry::viv_need bd create_bd_cell "create_bd_design"
    if {![dict exists $opts -type] || [dict get $opts -type] ne "ip" || ![dict exists $opts -vlnv]} {
        ::dry::fail "create_bd_cell: only -type ip -vlnv V is modelled"
    }
    return [::dry::new_cell create_bd_cell [dict get $opts -vlnv] [lindex $pos 0]]
}

# Objects: "/cell" for cells, "/cell/PIN" for (interface) pins, "/port" for interface ports.
proc ::dry::cell_of {cmd obj} {
    set name [string trimleft $obj /]
    if {![dict exists $::dry::cells $name]} {
        fail "$cmd: no bd cell '$name' (cells: [lsort [dict keys $::dry::cells]])"
    }
    return $name
}

proc ::dry::intf_pin {cmd path} {
    set parts [split [string trimleft $path /] /]
    if {[llength $parts] != 2} { fail "$cmd: '$path' is not CELL/INTERFACE" }
    lassign $parts cell pin
    set cell [cell_of $cmd $cell]
    set intf [dict get $::dry::cells $cell intf]
    if {![dict exists $intf $pin]} {
        fail "$cmd: cell '$cell' ([dict get $::dry::cells $cell vlnv]) has no interface '$pin' (has: [lsort [dict keys $intf]])"
    }
    return /$cell/$pin
}

proc ::dry::intf_info {obj} {
    set parts [split [string trimleft $obj /] /]
    if {[llength $parts] == 1} { return [dict get $::dry::ports [lindex $parts 0]] }
    return [dict get $::dry::cells [lindex $parts 0] intf [lindex $parts 1]]
}

proc ::dry::peer {obj} {
    foreach n $::dry::nets {
        lassign $n a b
        if {$a eq $obj} { return $b }
        if {$b eq $obj} { return $a }
    }
    return ""
}

proc ::dry::get_objs {cmd argv kind} {
    lassign [parse $cmd $argv {-quiet 0 -verbose 0 -hierarchical 0 -filter 1 -of_objects 1}] opts pos
    if {$pos eq {}} { fail "$cmd: no name given (listing everything is not modelled)" }
    set out {}
    foreach p $pos {
        switch -- $kind {
            cell  { lappend out /[cell_of $cmd $p] }
            intf  { lappend out [intf_pin $cmd $p] }
            pin   {
                lassign [split [string trimleft $p /] /] c pin
                set c [cell_of $cmd $c]
                if {![dict exists $::dry::cells $c pins $pin]} {
                    fail "$cmd: cell '$c' has no pin '$pin' (has: [lsort [dict keys [dict get $::dry::cells $c pins]]])"
                }
                lappend out /$c/$pin
            }
            port  {
                set n [string trimleft $p /]
                if {![dict exists $::dry::ports $n]} { fail "$cmd: no bd interface port '$n' (ports: [lsort [dict keys $::dry::ports]])" }
                lappend out /$n
            }
        }
    }
    return $out
}

proc ::get_bd_cells {args}      { ::dry::rec get_bd_cells $args;      ::dry::get_objs get_bd_cells $args cell }
proc ::get_bd_intf_pins {args}  { ::dry::rec get_bd_intf_pins $args;  ::dry::get_objs get_bd_intf_pins $args intf }
proc ::get_bd_pins {args}       { ::dry::rec get_bd_pins $args;       ::dry::get_objs get_bd_pins $args pin }
proc ::get_bd_intf_ports {args} { ::dry::rec get_bd_intf_ports $args; ::dry::get_objs get_bd_intf_ports $args port }

proc ::create_bd_intf_port {args} {
    ::dry::rec create_bd_intf_port $args
    lassign [::dry::parse create_bd_intf_port $args {-mode 1 -vlnv 1 -quiet 0 -verbose 0}] opts pos
    ::dry::need_pos create_bd_intf_port $pos 1 "a port name"
    ::dry::viv_need bd create_bd_intf_port "create_bd_design"
    foreach o {-mode -vlnv} { if {![dict exists $opts $o]} { ::dry::fail "create_bd_intf_port: $o is required" } }
    set mode [dict get $opts -mode]
    if {$mode ni {Master Slave MirroredMaster MirroredSlave Monitor}} { ::dry::fail "create_bd_intf_port: bad -mode '$mode'" }
    set name [lindex $pos 0]
    if {[dict exists $::dry::ports $name]} { ::dry::fail "create_bd_intf_port: port '$name' exists" }
    dict set ::dry::ports $name [dict create mode $mode type [dict get $opts -vlnv]]
    return /$name
}

proc ::dry::connect {cmd a b} {
    foreach o [list $a $b] {
        if {[peer $o] ne ""} { fail "$cmd: $o is already connected to [peer $o]" }
    }
    set ia [intf_info $a]
    set ib [intf_info $b]
    if {[dict get $ia type] ne [dict get $ib type]} {
        fail "$cmd: $a ([dict get $ia type]) and $b ([dict get $ib type]) are different interface types"
    }
    set ext [expr {[llength [split [string trimleft $a /] /]] == 1 || [llength [split [string trimleft $b /] /]] == 1}]
    set same [expr {[dict get $ia mode] eq [dict get $ib mode]}]
    if {$ext != $same} {
        fail "$cmd: cannot connect $a ([dict get $ia mode]) to $b ([dict get $ib mode])"
    }
    lappend ::dry::nets [list $a $b]
}

proc ::connect_bd_intf_net {args} {
    ::dry::rec connect_bd_intf_net $args
    lassign [::dry::parse connect_bd_intf_net $args {-intf_net 1 -boundary_type 1 -quiet 0 -verbose 0}] opts pos
    ::dry::need_pos connect_bd_intf_net $pos 2 "two interface objects"
    lassign $pos a b
    foreach o [list $a $b] {
        if {$o eq ""} { ::dry::fail "connect_bd_intf_net: an object is empty (a get_bd_* found nothing)" }
    }
    ::dry::connect connect_bd_intf_net $a $b
}

proc ::dry::ps_cells {} {
    set out {}
    dict for {n c} $::dry::cells { if {[dict get $c kind] eq "ps7"} { lappend out $n } }
    return $out
}

# Clock and reset of every cell an automation touches come from the PS FCLK_CLK0 / a proc_sys_reset.
proc ::dry::auto_clock {cells} {
    set ps [lindex [ps_cells] 0]
    if {$ps eq ""} { fail "apply_bd_automation: no processing_system7 to take a clock from" }
    set mhz [cfg $ps CONFIG.PCW_FPGA0_PERIPHERAL_FREQMHZ 50]
    set rst rst_${ps}_[expr {int($mhz)}]M
    if {![dict exists $::dry::cells $rst]} {
        new_cell apply_bd_automation xilinx.com:ip:proc_sys_reset $rst
        dict set ::dry::clocked /$rst/slowest_sync_clk /$ps/FCLK_CLK0
        dict set ::dry::clocked /$rst/ext_reset_in /$ps/FCLK_RESET0_N
    }
    foreach c [concat $cells $ps] {
        dict for {pin p} [dict get $::dry::cells $c pins] {
            if {[dict get $p dir] ne "I"} continue
            if {[dict get $p type] eq "clk"} { dict set ::dry::clocked /$c/$pin /$ps/FCLK_CLK0 }
            if {[dict get $p type] eq "rst"} { dict set ::dry::clocked /$c/$pin /$rst/peripheral_aresetn }
        }
    }
}

proc ::dry::grow_intc {cell side} {
    # next free S0n_AXI (side S) or M0n_AXI (side M) of an interconnect, adding one if needed
    set key [expr {$side eq "S" ? "CONFIG.NUM_SI" : "CONFIG.NUM_MI"}]
    set n [cfg $cell $key 1]
    for {set i 0} {$i < $n} {incr i} {
        set p /$cell/[format ${side}%02d_AXI $i]
        if {[peer $p] eq ""} { return $p }
    }
    dict set ::dry::cells $cell config $key [expr {$n + 1}]
    refresh_cell $cell
    return /$cell/[format ${side}%02d_AXI $n]
}

proc ::dry::automation_ps7 {cfg target} {
    set cell [cell_of apply_bd_automation $target]
    if {[dict get $::dry::cells $cell kind] ne "ps7"} { fail "apply_bd_automation processing_system7: $target is not a processing_system7" }
    dict for {k v} $cfg {
        if {$k ni {make_external apply_board_preset Master Slave}} { fail "apply_bd_automation processing_system7: unknown -config key '$k'" }
    }
    if {[dict exists $cfg apply_board_preset] && [dict get $cfg apply_board_preset]} {
        if {![dict exists $::dry::viv props board_part]} { fail "apply_bd_automation: apply_board_preset needs the project's board_part set first" }
        dict set ::dry::cells $cell config CONFIG.preset [dict get $::dry::viv props board_part]
    }
    if {[dict exists $cfg make_external]} {
        foreach i [split [dict get $cfg make_external] ", "] {
            if {$i eq ""} continue
            set pin [intf_pin apply_bd_automation /$cell/$i]
            dict set ::dry::ports $i [dict create mode Master type [dict get [intf_info $pin] type]]
            connect apply_bd_automation $pin /$i
        }
    }
}

proc ::dry::automation_axi4 {cfg target} {
    set C apply_bd_automation
    dict for {k v} $cfg {
        if {$k ni {Master Slave Clk Clk_master Clk_slave Clk_xbar ddr_seg intc_ip master_apm}} {
            fail "$C axi4: unknown -config key '$k'"
        }
    }
    set target [intf_pin $C $target]
    if {[peer $target] ne ""} {
        fail "$C axi4: target $target is already connected (to [peer $target]); automation only applies to an unconnected interface, target the other end"
    }
    set ti [intf_info $target]
    if {[dict get $ti type] ne $::dry::aximm} { fail "$C axi4: $target is not an AXI memory-mapped interface" }
    if {[dict get $ti mode] eq "Slave"} {
        if {![dict exists $cfg Master]} { fail "$C axi4: -config needs Master for slave target $target" }
        set m [intf_pin $C [dict get $cfg Master]]
        set s $target
        if {[dict exists $cfg Slave] && [intf_pin $C [dict get $cfg Slave]] ne $s} { fail "$C axi4: Slave in -config is not the target $target" }
    } else {
        if {![dict exists $cfg Slave]} { fail "$C axi4: -config needs Slave for master target $target" }
        set s [intf_pin $C [dict get $cfg Slave]]
        set m $target
        if {[dict exists $cfg Master] && [intf_pin $C [dict get $cfg Master]] ne $m} { fail "$C axi4: Master in -config is not the target $target" }
    }
    if {[dict get [intf_info $m] mode] ne "Master"} { fail "$C axi4: $m is not an AXI master" }
    if {[dict get [intf_info $s] mode] ne "Slave"} { fail "$C axi4: $s is not an AXI slave" }
    set mcell [lindex [split $m /] 1]
    set scell [lindex [split $s /] 1]
    set intc [expr {[dict exists $cfg intc_ip] ? [dict get $cfg intc_ip] : "Auto"}]
    # an interconnect already on either end is reused (PS M_AXI_GP0 -> periph interconnect, HP0 <- SmartConnect)
    set have ""
    foreach end [list $m $s] {
        set p [peer $end]
        if {$p ne "" && [dict get $::dry::cells [lindex [split $p /] 1] kind] in {smartconnect interconnect}} {
            set have [lindex [split $p /] 1]
        } elseif {$p ne ""} {
            fail "$C axi4: $end is already connected point-to-point to $p"
        }
    }
    switch -glob -- $intc {
        "New AXI SmartConnect" {
            if {$have ne ""} { fail "$C axi4: intc_ip '$intc' but $have already sits on this path" }
            set i 0; set name axi_smc
            while {[dict exists $::dry::cells $name]} { set name axi_smc_[incr i] }
            new_cell $C xilinx.com:ip:smartconnect $name
        }
        "New AXI Interconnect" - Auto {
            if {$have ne ""} {
                set name $have
            } else {
                set name ${mcell}_axi_periph
                if {[dict get $::dry::cells $mcell kind] ne "ps7"} { set name axi_interconnect_[llength $::dry::nets] }
                new_cell $C xilinx.com:ip:axi_interconnect $name
            }
        }
        /* {
            set name [cell_of "$C axi4 intc_ip" $intc]
            if {[dict get $::dry::cells $name kind] ni {smartconnect interconnect}} { fail "$C axi4: intc_ip $intc is not an interconnect" }
            if {$have ne "" && $have ne $name} { fail "$C axi4: intc_ip $intc but $have already sits on this path" }
        }
        default { fail "$C axi4: bad intc_ip '$intc'" }
    }
    if {[peer $m] eq ""} { connect $C $m [grow_intc $name S] }
    if {[peer $s] eq ""} { connect $C [grow_intc $name M] $s }
    auto_clock [list $mcell $scell $name]
}

proc ::apply_bd_automation {args} {
    ::dry::rec apply_bd_automation $args
    lassign [::dry::parse apply_bd_automation $args {-rule 1 -config 1 -dict 1 -opts 1 -quiet 0 -verbose 0}] opts pos
    ::dry::need_pos apply_bd_automation $pos 1 "one target object"
    ::dry::viv_need bd apply_bd_automation "create_bd_design"
    set cfg [expr {[dict exists $opts -config] ? [dict get $opts -config] : {}}]
    if {[llength $cfg] % 2} { ::dry::fail "apply_bd_automation: -config is not a key/value list: $cfg" }
    set target [lindex $pos 0]
    if {$target eq ""} { ::dry::fail "apply_bd_automation: empty target (a get_bd_* found nothing)" }
    switch -- [expr {[dict exists $opts -rule] ? [dict get $opts -rule] : ""}] {
        xilinx.com:bd_rule:processing_system7 { ::dry::automation_ps7 $cfg $target }
        xilinx.com:bd_rule:axi4 { ::dry::automation_axi4 $cfg $target }
        default { ::dry::fail "apply_bd_automation: rule '[dict get $opts -rule]' is not modelled" }
    }
}

proc ::dry::set_cell_prop {cell name value} {
    set kind [dict get $::dry::cells $cell kind]
    if {$name eq "name" || $name eq "location"} { return }
    if {![string match CONFIG.* $name]} { fail "set_property: cell property '$name' is not modelled" }
    set ok [switch -- $kind {
        ps7 { regexp {^CONFIG\.PCW_\w+$} $name }
        gpio { expr {$name in {CONFIG.C_GPIO_WIDTH CONFIG.C_ALL_OUTPUTS CONFIG.C_ALL_INPUTS CONFIG.C_IS_DUAL
                              CONFIG.C_GPIO2_WIDTH CONFIG.C_ALL_OUTPUTS_2 CONFIG.C_ALL_INPUTS_2 CONFIG.C_DOUT_DEFAULT
                              CONFIG.C_TRI_DEFAULT CONFIG.C_INTERRUPT_PRESENT CONFIG.GPIO_BOARD_INTERFACE
                              CONFIG.USE_BOARD_FLOW}} }
        hls { regexp {^CONFIG\.C_(M|S)_AXI_\w+$} $name }
        smartconnect - interconnect { expr {$name in {CONFIG.NUM_SI CONFIG.NUM_MI CONFIG.NUM_CLKS}} }
        default { expr 1 }
    }]
    if {!$ok} { fail "set_property: [dict get $::dry::cells $cell vlnv] has no parameter '$name'" }
    if {[regexp {PCW_USE_|C_ALL_|C_IS_DUAL|C_INTERRUPT} $name] && $value ni {0 1}} { fail "set_property $name: must be 0 or 1, got '$value'" }
    if {$name eq "CONFIG.C_GPIO_WIDTH" && !([string is integer -strict $value] && $value >= 1 && $value <= 32)} {
        fail "set_property CONFIG.C_GPIO_WIDTH: must be 1..32, got '$value'"
    }
    if {[string match *FREQMHZ $name] && !([string is double -strict $value] && $value > 0 && $value <= 250)} {
        fail "set_property $name: '$value' is not a PL clock frequency in MHz"
    }
    dict set ::dry::cells $cell config $name $value
    refresh_cell $cell
}

proc ::set_property {args} {
    ::dry::rec set_property $args
    lassign [::dry::parse set_property $args {-dict 1 -quiet 0 -verbose 0 -objects 1}] opts pos
    if {[dict exists $opts -dict]} {
        set pairs [dict get $opts -dict]
        set objs $pos
    } else {
        if {[llength $pos] < 3} { ::dry::fail "set_property: expected NAME VALUE OBJECTS, got $pos" }
        set pairs [lrange $pos 0 1]
        set objs [lrange $pos 2 end]
    }
    set objs [concat {*}$objs]
    if {$objs eq {}} { ::dry::fail "set_property: no object (a get_* found nothing)" }
    foreach obj $objs {
        foreach {k v} $pairs {
            if {[dict exists $::dry::viv project] && $obj eq [dict get $::dry::viv project]} {
                ::dry::set_project_prop $k $v
            } elseif {[string match /* $obj] && [dict exists $::dry::cells [string trimleft $obj /]]} {
                ::dry::set_cell_prop [string trimleft $obj /] $k $v
            } elseif {$obj in {sources_1 constrs_1 sim_1 synth_1 impl_1}} {
                dict set ::dry::viv objprops $obj [string tolower $k] $v
            } else {
                ::dry::fail "set_property $k: unknown object '$obj'"
            }
        }
    }
}

proc ::get_property {args} {
    ::dry::rec get_property $args
    lassign [::dry::parse get_property $args {-quiet 0 -verbose 0 -min 0 -max 0}] opts pos
    ::dry::need_pos get_property $pos 2 "NAME OBJECT"
    lassign $pos name obj
    if {$obj in {synth_1 impl_1}} {
        set r [expr {[dict exists $::dry::viv runs $obj] ? [dict get $::dry::viv runs $obj] : {}}]
        switch -- [string toupper $name] {
            PROGRESS { return [expr {[dict exists $r waited] ? "100%" : "0%"}] }
            STATUS   { return [expr {[dict exists $r waited] ? "[dict get $r step] Complete!" : "Not started"}] }
            DIRECTORY { return [file join [dict get $::dry::viv dir] [dict get $::dry::viv project].runs $obj] }
        }
    } elseif {[string match /* $obj]} {
        return [::dry::cfg [::dry::cell_of get_property $obj] $name ""]
    }
    ::dry::fail "get_property: property $name of '$obj' is not modelled"
}

proc ::get_runs {args} {
    ::dry::rec get_runs $args
    lassign [::dry::parse get_runs $args {-quiet 0 -verbose 0 -filter 1}] opts pos
    ::dry::need_pos get_runs $pos 1 "a run name"
    if {[lindex $pos 0] ni {synth_1 impl_1}} { ::dry::fail "get_runs: no run '[lindex $pos 0]' (runs: synth_1 impl_1)" }
    return [lindex $pos 0]
}

proc ::assign_bd_address {args} {
    ::dry::rec assign_bd_address $args
    ::dry::parse assign_bd_address $args {-target_address_space 1 -offset 1 -range 1 -force 0 -quiet 0 -verbose 0 -combine_segments 0}
    ::dry::viv_need bd assign_bd_address "create_bd_design"
    set ::dry::addresses [::dry::address_paths]
    dict set ::dry::viv addressed [llength $::dry::nets]
}

# Every (AXI master of a non-interconnect cell, reachable slave of a non-interconnect cell) pair.
proc ::dry::address_paths {} {
    set out {}
    dict for {cell c} $::dry::cells {
        if {[dict get $c kind] in {smartconnect interconnect}} continue
        dict for {pin i} [dict get $c intf] {
            if {[dict get $i type] ne $::dry::aximm || [dict get $i mode] ne "Master"} continue
            set p [peer /$cell/$pin]
            if {$p eq ""} continue
            set ic [lindex [split $p /] 1]
            if {[dict get $::dry::cells $ic kind] ni {smartconnect interconnect}} {
                lappend out [list /$cell/$pin $p]
                continue
            }
            dict for {ip ii} [dict get $::dry::cells $ic intf] {
                if {[dict get $ii mode] eq "Master" && [peer /$ic/$ip] ne ""} { lappend out [list /$cell/$pin [peer /$ic/$ip]] }
            }
        }
    }
    return $out
}

proc ::validate_bd_design {args} {
    ::dry::rec validate_bd_design $args
    ::dry::parse validate_bd_design $args {-force 0 -design 1 -quiet 0 -verbose 0}
    ::dry::viv_need bd validate_bd_design "create_bd_design"
    dict for {cell c} $::dry::cells {
        dict for {pin i} [dict get $c intf] {
            if {[dict get $i type] eq $::dry::aximm && [dict get $c kind] in {hls gpio} && [::dry::peer /$cell/$pin] eq ""} {
                ::dry::fail "validate_bd_design: AXI interface /$cell/$pin is not connected"
            }
        }
        dict for {pin p} [dict get $c pins] {
            if {[dict get $p dir] eq "I" && [dict get $p type] in {clk rst} && ![dict exists $::dry::clocked /$cell/$pin]} {
                ::dry::fail "validate_bd_design: [dict get $p type] pin /$cell/$pin is not connected"
            }
        }
    }
    foreach ps [::dry::ps_cells] {
        foreach i {DDR FIXED_IO} { if {[::dry::peer /$ps/$i] eq ""} { ::dry::fail "validate_bd_design: /$ps/$i is not made external" } }
    }
    if {![dict exists $::dry::viv addressed] || [dict get $::dry::viv addressed] != [llength $::dry::nets]} {
        ::dry::fail "validate_bd_design: connections were made after the last assign_bd_address (unassigned slave segments)"
    }
    foreach cell [dict keys $::dry::cells] {
        dict for {pin i} [dict get $::dry::cells $cell intf] {
            if {[dict get $i mode] eq "Slave" && [dict get $i type] eq $::dry::aximm && [dict get $::dry::cells $cell kind] ni {smartconnect interconnect}} {
                if {[lsearch -index 1 $::dry::addresses /$cell/$pin] < 0} { ::dry::fail "validate_bd_design: slave /$cell/$pin has no address (no master reaches it)" }
            }
        }
    }
    dict set ::dry::viv validated [llength $::dry::nets]
}

proc ::save_bd_design {args} {
    ::dry::rec save_bd_design $args
    ::dry::parse save_bd_design $args {-quiet 0 -verbose 0}
    ::dry::viv_need bd save_bd_design "create_bd_design"
}

proc ::get_files {args} {
    ::dry::rec get_files $args
    lassign [::dry::parse get_files $args {-quiet 0 -verbose 0 -all 0 -of_objects 1 -filter 1 -compile_order 1 -used_in 1}] opts pos
    ::dry::need_pos get_files $pos 1 "a file name pattern"
    set all [concat {*}[dict values [dict get $::dry::viv files]]]
    set hits [lmap f $all { expr {[string match [lindex $pos 0] [file tail $f]] || [string match [lindex $pos 0] $f] ? $f : [continue]} }]
    if {$hits eq {}} { ::dry::fail "get_files: no project file matches '[lindex $pos 0]' (files: [lmap f $all {file tail $f}])" }
    return $hits
}

# Top-level ports of the wrapper: PS-fixed DDR/FIXED_IO, plus the scalar bits of each external GPIO.
proc ::dry::wrapper_ports {} {
    set out [dict create]
    dict for {name p} $::dry::ports {
        set src [peer /$name]
        if {$src eq ""} continue
        lassign [split [string trimleft $src /] /] cell pin
        if {[dict get $::dry::cells $cell kind] eq "ps7"} { dict set out $name* ps7; continue }
        if {[dict get $p type] ne "xilinx.com:interface:gpio_rtl:1.0"} { fail "make_wrapper: external port $name type [dict get $p type] is not modelled" }
        set sfx [expr {$pin eq "GPIO2" ? "_2" : ""}]
        set w [cfg $cell CONFIG.C_GPIO[expr {$sfx eq "" ? "" : "2"}]_WIDTH 32]
        set kind [expr {[cfg $cell CONFIG.C_ALL_OUTPUTS$sfx 0] ? "tri_o" : ([cfg $cell CONFIG.C_ALL_INPUTS$sfx 0] ? "tri_i" : "tri_io")}]
        for {set i 0} {$i < $w} {incr i} { dict set out "${name}_${kind}\[$i\]" /$cell/$pin }
    }
    return $out
}

proc ::make_wrapper {args} {
    ::dry::rec make_wrapper $args
    lassign [::dry::parse make_wrapper $args {-files 1 -top 0 -import 0 -force 0 -fileset 1 -testbench 0 -inst_template 0 -quiet 0 -verbose 0}] opts pos
    if {![dict exists $opts -files]} { ::dry::fail "make_wrapper: -files is required" }
    set bdfile [::dry::viv_need bdfile make_wrapper "create_bd_design"]
    if {[::dry::abs [dict get $opts -files]] ne $bdfile} { ::dry::fail "make_wrapper: -files [dict get $opts -files] is not the block design $bdfile" }
    if {![dict exists $::dry::viv validated] || [dict get $::dry::viv validated] != [llength $::dry::nets]} {
        ::dry::fail "make_wrapper: block design changed since validate_bd_design"
    }
    set bd [dict get $::dry::viv bd]
    dict set ::dry::viv wrapper ${bd}_wrapper
    dict set ::dry::viv wrapper_ports [::dry::wrapper_ports]
    if {[dict exists $opts -top] && [dict exists $opts -import]} {
        dict with ::dry::viv { dict lappend files sources_1 [file join $dir $project.srcs sources_1 imports hdl ${bd}_wrapper.v] }
    } elseif {![dict exists $opts -top]} {
        ::dry::fail "make_wrapper: without -top the wrapper is not the design's top"
    }
}

proc ::dry::viv_add_files {argv} {
    lassign [parse add_files $argv {-fileset 1 -norecurse 0 -scan_for_includes 0 -copy_to 1 -force 0 -quiet 0 -verbose 0}] opts pos
    viv_need project add_files "create_project"
    set fs [expr {[dict exists $opts -fileset] ? [dict get $opts -fileset] : "sources_1"}]
    if {$fs ni {sources_1 constrs_1 sim_1}} { fail "add_files: no fileset '$fs'" }
    foreach f [concat {*}$pos] {
        set f [need_file add_files $f]
        if {$fs eq "constrs_1" && [file extension $f] ni {.xdc .tcl}} { fail "add_files: $f is not a constraints file" }
        dict with ::dry::viv { dict lappend files $fs $f }
    }
}

proc ::read_xdc {args} {
    ::dry::rec read_xdc $args
    lassign [::dry::parse read_xdc $args {-unmanaged 0 -ref 1 -cells 1 -mode 1 -quiet 0 -verbose 0}] opts pos
    foreach f $pos { dict with ::dry::viv { dict lappend files constrs_1 [::dry::need_file read_xdc $f] } }
}

# Source each constraints file in a child interpreter where get_ports sees the wrapper's ports.
proc ::dry::check_xdc {ports} {
    set ::dry::xdc_ports [dict create]
    foreach f [dict get $::dry::viv files constrs_1] {
        set child [interp create]
        $child alias get_ports ::dry::xdc_get_ports $ports
        $child alias set_property ::dry::xdc_set_property $f
        foreach c {create_clock set_false_path set_input_delay set_output_delay get_pins get_cells get_clocks} {
            $child alias $c ::dry::fail "XDC $f: $c is not modelled by dryrun.tcl"
        }
        if {[catch {$child eval [list source $f]} msg]} { interp delete $child; fail "XDC [file tail $f]: $msg" }
        interp delete $child
    }
    dict for {port src} $ports {
        if {$src eq "ps7"} continue
        if {![dict exists $::dry::xdc_ports $port]} { fail "launch_runs: top-level port $port (from $src) has no constraints" }
        set c [dict get $::dry::xdc_ports $port]
        foreach k {PACKAGE_PIN IOSTANDARD} {
            if {![dict exists $c $k]} { fail "launch_runs: port $port has no $k in the XDC" }
        }
        set pin [dict get $c PACKAGE_PIN]
        if {![dict exists $::dry::pmod_pins $pin]} { fail "launch_runs: port $port on pin $pin, which is not a ZedBoard PMOD pin" }
        if {[dict get $c IOSTANDARD] ne "LVCMOS33"} {
            fail "launch_runs: port $port on $pin ([dict get $::dry::pmod_pins $pin], 3.3 V bank 13) needs IOSTANDARD LVCMOS33, not [dict get $c IOSTANDARD]"
        }
    }
    set used [dict create]
    dict for {port c} $::dry::xdc_ports {
        if {[dict exists $c PACKAGE_PIN]} {
            set pin [dict get $c PACKAGE_PIN]
            if {[dict exists $used $pin]} { fail "launch_runs: pin $pin is used by both [dict get $used $pin] and $port" }
            dict set used $pin $port
        }
    }
}

proc ::dry::xdc_get_ports {ports args} {
    if {[lindex $args 0] eq "-quiet"} { set args [lrange $args 1 end] }
    set out {}
    foreach pat [concat {*}$args] {
        set hits [lmap p [dict keys $ports] { expr {$p eq $pat || [string match [string map {[ \\[ ] \\]} $pat] $p] ? $p : [continue]} }]
        if {$hits eq {}} { fail "get_ports: no top-level port matches '$pat' (ports: [lsort [dict keys $ports]])" }
        lappend out {*}$hits
    }
    return $out
}

proc ::dry::xdc_set_property {file args} {
    if {[lindex $args 0] eq "-dict"} {
        set pairs [lindex $args 1]
        set objs [lrange $args 2 end]
    } else {
        set pairs [lrange $args 0 1]
        set objs [lrange $args 2 end]
    }
    set objs [concat {*}$objs]
    if {$objs eq {}} { fail "set_property: no port" }
    foreach o $objs { foreach {k v} $pairs { dict set ::dry::xdc_ports $o [string toupper $k] $v } }
}

proc ::launch_runs {args} {
    ::dry::rec launch_runs $args
    lassign [::dry::parse launch_runs $args {-jobs 1 -to_step 1 -next_step 0 -force 0 -dir 1 -scripts_only 0 -quiet 0 -verbose 0}] opts pos
    ::dry::need_pos launch_runs $pos 1 "a run name"
    set run [lindex $pos 0]
    if {$run ni {synth_1 impl_1}} { ::dry::fail "launch_runs: no run '$run'" }
    if {[dict exists $opts -jobs] && !([string is integer -strict [dict get $opts -jobs]] && [dict get $opts -jobs] >= 1)} {
        ::dry::fail "launch_runs: -jobs must be a positive integer"
    }
    set steps {opt_design power_opt_design place_design post_place_power_opt_design phys_opt_design route_design post_route_phys_opt_design write_bitstream}
    set step [expr {[dict exists $opts -to_step] ? [dict get $opts -to_step] : ($run eq "impl_1" ? "route_design" : "synth_design")}]
    if {$run eq "impl_1" && $step ni $steps} { ::dry::fail "launch_runs: -to_step '$step' is not an implementation step" }
    set top [::dry::viv_need wrapper launch_runs "make_wrapper -top"]
    ::dry::check_xdc [dict get $::dry::viv wrapper_ports]
    set v $::dry::viv
    set bd [dict get $v bd]
    ::dry::vfs_add [file join [dict get $v dir] [dict get $v project].gen sources_1 bd $bd hw_handoff $bd.hwh] file launch_runs
    if {$step eq "write_bitstream"} {
        ::dry::vfs_add [file join [dict get $v dir] [dict get $v project].runs $run $top.bit] file launch_runs
    }
    dict set ::dry::viv runs $run [dict create step $step]
}

proc ::wait_on_run {args} {
    ::dry::rec wait_on_run $args
    lassign [::dry::parse wait_on_run $args {-timeout 1 -quiet 0 -verbose 0}] opts pos
    ::dry::need_pos wait_on_run $pos 1 "a run name"
    set run [lindex $pos 0]
    if {![dict exists $::dry::viv runs $run]} { ::dry::fail "wait_on_run: run $run was not launched" }
    dict set ::dry::viv runs $run waited 1
}

proc ::write_bd_tcl {args} {
    ::dry::rec write_bd_tcl $args
    lassign [::dry::parse write_bd_tcl $args {-force 0 -bd_name 1 -bd_folder 1 -no_project_wrapper 0 -quiet 0 -verbose 0}] opts pos
    ::dry::viv_need bd write_bd_tcl "create_bd_design"
    ::dry::need_pos write_bd_tcl $pos 1 "a file name"
    ::dry::vfs_add [lindex $pos 0] file write_bd_tcl
}

foreach cmd {startgroup endgroup regenerate_bd_layout update_compile_order generate_target close_project close_bd_design} {
    proc ::$cmd {args} "::dry::rec $cmd \$args"
}

# Commands both tools have, with different options.
proc ::add_files {args} {
    ::dry::rec add_files $args
    if {$::dry::tool eq "vitis_hls"} { ::dry::hls_add_files $args } else { ::dry::viv_add_files $args }
}

proc ::create_clock {args} {
    ::dry::rec create_clock $args
    if {$::dry::tool ne "vitis_hls"} { ::dry::fail "create_clock: only modelled in Vitis HLS (put Vivado clocks in the XDC)" }
    ::dry::hls_create_clock $args
}

proc ::unknown {cmd args} {
    ::dry::fail "$cmd: command not modelled by dryrun.tcl (misspelled, or not a $::dry::tool command this harness knows)"
}

# ---------------------------------------------------------------- end-of-run checks
proc ::dry::final_checks {scripts} {
    set tools [lmap s $scripts { lindex $s 0 }]
    if {"vitis_hls" in $tools} {
        if {![dict exists $::dry::hls ip]} { fail "hls: the script never exported the IP (export_design)" }
        lappend ::dry::checks hls_ip_exported
    }
    if {"vivado" in $tools} {
        set ovl $::dry::overlay_bit
        if {$ovl eq ""} {
            set vs [lindex $scripts [lsearch $tools vivado] 1]
            set ovl [file join [file dirname [file dirname [abs $vs]]] overlay ddi_engine.bit]
        }
        set ovl [abs $ovl]
        set want [dict create .bit $ovl .hwh [file rootname $ovl].hwh]
        set pat [dict create .bit *.runs/impl_1/*.bit .hwh *.gen/sources_1/bd/*/hw_handoff/*.hwh]
        dict for {ext dst} $want {
            set src [lsearch -inline -index 1 $::dry::copies $dst]
            if {$src eq ""} {
                fail "overlay: nothing copied to $dst, where ddi_hw/deploy/board.py looks (copies: $::dry::copies)"
            }
            if {![string match [dict get $pat $ext] [lindex $src 0]]} { fail "overlay: $dst is a copy of [lindex $src 0], not the $ext the run produced" }
        }
        lappend ::dry::checks overlay_pair_where_board_py_looks
        if {[dict exists $::dry::hls clock_ns]} {
            set ps [lindex [ps_cells] 0]
            set mhz [cfg $ps CONFIG.PCW_FPGA0_PERIPHERAL_FREQMHZ 50]
            if {$mhz > 1000.0 / [dict get $::dry::hls clock_ns] + 1e-6} {
                fail "clock: FCLK_CLK0 $mhz MHz is faster than the HLS target ([dict get $::dry::hls clock_ns] ns)"
            }
            lappend ::dry::checks fclk_within_hls_clock
        }
    }
}

# ---------------------------------------------------------------- JSON
proc ::dry::js {s} {
    set m [dict create \\ \\\\ \" \\\" \n \\n \r \\r \t \\t]
    for {set i 0} {$i < 32} {incr i} {
        set c [format %c $i]
        if {![dict exists $m $c]} { dict set m $c [format \\u%04x $i] }
    }
    return "\"[string map $m $s]\""
}
proc ::dry::jarr {items} { return "\[[join $items ,]\]" }
proc ::dry::jstrs {items} { jarr [lmap i $items { js $i }] }
proc ::dry::jobj {pairs} {
    set out {}
    foreach {k v} $pairs { lappend out "[js $k]:$v" }
    return "{[join $out ,]}"
}
proc ::dry::jdict {d} {
    # a flat dict of strings
    set out {}
    dict for {k v} $d { lappend out $k [js $v] }
    return [jobj $out]
}

proc ::dry::report {ok err where scripts} {
    set calls [lmap c $::dry::calls {
        jobj [list tool [js [dict get $c tool]] script [js [dict get $c script]] \
                   line [expr {[dict get $c line] eq "" ? "null" : [dict get $c line]}] \
                   cmd [js [dict get $c cmd]] args [jstrs [dict get $c args]]]
    }]
    set cells [dict create]
    dict for {n c} $::dry::cells {
        set intf [dict create]
        dict for {p i} [dict get $c intf] { dict set intf $p [dict get $i mode] }
        lappend cells $n [jobj [list vlnv [js [dict get $c vlnv]] config [jdict [dict get $c config]] \
            interfaces [jdict $intf] pins [jstrs [dict keys [dict get $c pins]]]]]
    }
    set hls [dict create]
    foreach k {project top part clock_ns solution flow} { if {[dict exists $::dry::hls $k]} { lappend hls $k [js [dict get $::dry::hls $k]] } }
    foreach k {files tb_files} { if {[dict exists $::dry::hls $k]} { lappend hls $k [jstrs [dict get $::dry::hls $k]] } }
    if {[dict exists $::dry::hls ip]} {
        set ip [dict get $::dry::hls ip]
        set intf [dict create]
        dict for {p i} [dict get $ip interfaces] { dict set intf $p [dict get $i mode] }
        lappend hls ip [jobj [list vlnv [js [dict get $ip vlnv]] dir [js [dict get $ip dir]] interfaces [jdict $intf]]]
    }
    set viv [dict create]
    foreach k {project part bd wrapper} { if {[dict exists $::dry::viv $k]} { lappend viv $k [js [dict get $::dry::viv $k]] } }
    if {[dict exists $::dry::viv props]} { lappend viv props [jdict [dict get $::dry::viv props]] }
    if {[dict exists $::dry::viv files]} { lappend viv files [jobj [concat {*}[lmap {k v} [dict get $::dry::viv files] { list $k [jstrs $v] }]]] }
    if {[dict exists $::dry::viv wrapper_ports]} { lappend viv wrapper_ports [jdict [dict get $::dry::viv wrapper_ports]] }
    set ports [dict create]
    dict for {n p} $::dry::ports { dict set ports $n [dict get $p type] }
    set out [jobj [list \
        ok [expr {$ok ? "true" : "false"}] \
        error [expr {$ok ? "null" : [js $err]}] \
        where [expr {$where eq "" ? "null" : [js $where]}] \
        part [js $::dry::part] \
        scripts [jarr [lmap s $scripts { jobj [list tool [js [lindex $s 0]] path [js [lindex $s 1]]] }]] \
        calls [jarr $calls] \
        hls [jobj $hls] \
        vivado [jobj $viv] \
        bd [jobj [list cells [jobj $cells] ports [jdict $ports] \
            nets [jarr [lmap n $::dry::nets { jstrs $n }]] \
            clocks [jdict $::dry::clocked] \
            addresses [jarr [lmap a $::dry::addresses { jstrs $a }]]]] \
        xdc [jobj [concat {*}[lmap {p c} $::dry::xdc_ports { list $p [jdict $c] }]]] \
        copies [jarr [lmap c $::dry::copies { jstrs $c }]] \
        outputs [jstrs $::dry::outputs] \
        checks [jstrs $::dry::checks]]]
    ::dry::_puts stdout $out
}

# ---------------------------------------------------------------- main
proc ::dry::usage {msg} {
    ::dry::_puts stderr "dryrun.tcl: $msg\nusage: tclsh dryrun.tcl \[-part PART\] \[-overlay BIT\] \[vitis_hls:|vivado:\]SCRIPT..."
    ::dry::_exit 2
}

proc ::dry::main {argv} {
    set scripts {}
    for {set i 0} {$i < [llength $argv]} {incr i} {
        set a [lindex $argv $i]
        switch -glob -- $a {
            -part    { set ::dry::part [lindex $argv [incr i]] }
            -overlay { set ::dry::overlay_bit [lindex $argv [incr i]] }
            -*       { usage "unknown option $a" }
            default {
                if {[regexp {^(vitis_hls|vivado):(.*)$} $a -> t p]} {
                } else {
                    set p $a
                    set t [expr {[string match hls* [::dry::_file tail $a]] ? "vitis_hls" : "vivado"}]
                }
                if {![::dry::_file isfile $p]} { usage "no such script: $p" }
                lappend scripts [list $t [::dry::_file normalize $p]]
            }
        }
    }
    if {$scripts eq {}} { usage "no script given" }
    builtin_catalog
    set ok 1
    set err ""
    set where ""
    foreach s $scripts {
        lassign $s ::dry::tool ::dry::script
        set ::dry::cwd [::dry::_pwd]
        set before [info globals]
        set rc [catch {uplevel #0 [list source $::dry::script]} msg opts]
        foreach g [info globals] { if {$g ni $before} { uplevel #0 [list unset -nocomplain $g] } }
        if {$rc == 1 && [lrange [dict get $opts -errorcode] 0 1] eq {DRYRUN EXIT}} {
            set code [lindex [dict get $opts -errorcode] 2]
            if {$code != 0} { set ok 0; set err "script called exit $code" }
        } elseif {$rc == 1} {
            set ok 0
            set err $msg
            set line ""
            if {[lrange [dict get $opts -errorcode] 0 1] eq {DRYRUN FAIL}} { set line $::dry::fail_line }
            if {$line eq ""} { regexp "\\(file \"[string map {\\ \\\\ . \\. + \\+ ( \\( ) \\)} $::dry::script]\" line (\\d+)\\)" [dict get $opts -errorinfo] -> line }
            set where "[::dry::_file tail $::dry::script]:$line"
        } elseif {$rc != 0 && $rc != 2} {
            set ok 0
            set err "script ended with [list break/continue] outside a loop"
        }
        if {!$ok} {
            if {$where eq ""} { set where [::dry::_file tail $::dry::script] }
            break
        }
    }
    if {$ok && [catch {::dry::final_checks $scripts} msg]} {
        set ok 0
        set err $msg
        set where "end of run"
    }
    report $ok $err $where $scripts
    if {!$ok} {
        ::dry::_puts stderr "dryrun: FAIL at $where: $err"
        ::dry::_exit 1
    }
    ::dry::_puts stderr "dryrun: OK [llength $::dry::calls] tool calls checked ([join [lmap s $scripts {::dry::_file tail [lindex $s 1]}] {, }]; checks: [join $::dry::checks {, }])"
    ::dry::_exit 0
}

::dry::main $argv
