"""dsd: decentralized speculative decoding over a peer-to-peer network of inference nodes."""

__version__ = "0.1.0"
