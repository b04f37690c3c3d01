"""Everything the board runs, torch-free and Python 3.10-clean (numpy, PyYAML, safetensors' numpy
API; pynq imported lazily by the board backend only):

    bundle      the bundle format, its integrity checks and the program rules (one owner)
    fixedpoint  the bit-exact numpy reference of the engine's arithmetic
    processor   the float ops of the ARM side (gates' numpy forwards, GATE_OPS)
    regmap      the engine's register map (regmap.yaml), read by the driver, C-sim and HLS header
    backends    reference | csim | board, and the interpreter of a bundle's program (run_image)
    budget      the hard-budget rule (anytime exits) and the executed cost, shared with the model
    csim        the HLS C++ engine compiled with g++, called through ctypes
    board       the PYNQ driver (binds to the engine IP by VLNV)
    runner      `ddi-hw run` and a deploy folder's `validate.py`

The workstation side (`ddi_hw.export`) writes bundles through `bundle.write_bundle`; nothing here
imports from outside this package except `ddi_hw.errors` and `energy_models.{errors,atomic}`
(standard library only).
"""
