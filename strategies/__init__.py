"""Package data of autoq (installed as `autoq.strategies`): strategy presets, one TOML file each."""
