"""Experiment definitions (TOML files beside this module) and the code that runs them."""
