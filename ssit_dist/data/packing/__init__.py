"""Packing fundus photographs into shards, offline: finding inputs, cropping, saliency, tar writing."""
