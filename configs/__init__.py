"""YAML presets of psa-vlm (installed as the package data ``psa_vlm.presets``)."""
