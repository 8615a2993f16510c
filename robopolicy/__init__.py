"""robopolicy: robot policy learning."""
__version__ = "0.1.0"
