"""How much does a layer cost on this hardware? Layer specs, presets, SCALE-Sim runner, Eq. 6."""
