"""modules_forge/forge_version.py (reference §1.4: 2.0.1v1.10.1 / neo / classic / 1.0.0v2-v1.10.1RC).
The fixture sets ``version`` per variant."""

version = "2.0.1v1.10.1"
