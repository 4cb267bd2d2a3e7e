"""hps-exp: preference alignment with DPO, Bradley-Terry, Plackett-Luce and Hard Preference Sampling."""
__version__ = "0.1.0"
