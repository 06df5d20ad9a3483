"""moecompress: post-training compression for Mixture-of-Experts LLMs."""

__version__ = "0.1.0"
