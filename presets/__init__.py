"""Shipped presets (TOML), installed as the `medgen_cli.presets` resource package."""
