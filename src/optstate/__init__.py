"""optstate: is it fine to throw the optimizer away between training sessions?"""

__version__ = "0.1.0"
