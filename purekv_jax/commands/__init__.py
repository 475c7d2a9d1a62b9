"""Sub-commands of the ``purekv`` command line that live outside ``cli.py``."""
