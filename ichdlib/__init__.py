"""ichdlib: the tested library behind the ichd-workbench notebooks."""

__version__ = "0.1.0"
