"""clsim's built-in strategy plugins (installed as ``clsim_plugins``).

Each is registered through the ``clsim.plugins`` entry-point group in pyproject.toml,
exactly as a third-party plugin would be; clsim itself never imports them by name.
"""
