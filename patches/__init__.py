"""Per-family patch specs (TOML), shipped as package data of fastkern.patches. See docs/patches.md."""
