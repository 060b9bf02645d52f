"""Offline mini-GenEval: synthetic shapes, a tiny pretrained SD3 pipeline for them, and its rule reward."""
