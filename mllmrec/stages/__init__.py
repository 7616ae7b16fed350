"""Pipeline stages as a library."""
