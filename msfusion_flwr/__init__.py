"""MSfusion on Flower: collaborative training of a model larger than any participant can hold."""

__version__ = "0.1.0"
