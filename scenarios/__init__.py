"""Bundled scenario YAMLs, installed as ``clsim_scenarios`` so ``clsim run NAME`` finds them."""
