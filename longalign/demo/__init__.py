"""The embedded default (`make demo`): a tiny pretrained base and LongAlign run on it offline."""
