"""How much does a layer cost on this hardware? Layer specs, presets, SCALE-Sim runner, Eq. 6.

Public API: `profile_model`, `load_preset`, `extract_specs` (imported lazily so SCALE-Sim worker
processes and `ddi-hw --help` stay light).
"""

__all__ = ["profile_model", "profile_specs", "load_preset", "extract_specs", "LayerSpec"]


def __getattr__(name):
    if name in ("profile_model", "profile_specs"):
        from energy_models import profile
        return getattr(profile, name)
    if name == "load_preset":
        from energy_models.presets import load_preset
        return load_preset
    if name in ("extract_specs", "LayerSpec"):
        from energy_models import specs
        return getattr(specs, name)
    raise AttributeError(f"module 'energy_models' has no attribute {name!r}")
