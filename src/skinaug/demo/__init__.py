"""Everything only the demo profile runs: the embedded world (world) and the tiny base model pretrained on its web corpus (tinymodel)."""
