"""Per-family patch specs (TOML), shipped as package data of fastkern.patches. See CONTRIBUTING.md ("Adding a model family") and docs/families.md."""
