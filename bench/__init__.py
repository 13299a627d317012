"""Scripts that put the real daemons under load and faults, and print figures."""
