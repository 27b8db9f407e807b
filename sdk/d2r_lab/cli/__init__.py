"""The lab's commands, one module each: ``d2r eval``, ``d2r datasets``, ``d2r detector``, ``d2r show``.
Registered through the ``d2r.commands`` entry points (setup.cfg)."""
