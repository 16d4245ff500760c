"""Reading shards while training: sources, the epoch plan, streams, loader workers, augmentation."""
