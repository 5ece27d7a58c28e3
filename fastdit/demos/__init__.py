"""End-to-end jobs on embedded data (no downloads): ``fastdit demo`` runs :mod:`fastdit.demos.digits`."""
