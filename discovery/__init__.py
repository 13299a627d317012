"""How the gateway finds orchestrators (static list, registry file). Filled in by the gateway work."""
