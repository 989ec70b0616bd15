"""tierflow: a discrete-event simulator of tiered memory for Mixture-of-Experts expert offloading."""

__version__ = "0.1.0"
