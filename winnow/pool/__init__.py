"""The DataComp-format data layer: uids, shards, the demo world."""
