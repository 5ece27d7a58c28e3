"""Bridges to other libraries (diffusers). They import fastdit's modules and ops; nothing in fastdit
imports them."""
