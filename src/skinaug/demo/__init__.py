"""What only the demo profile runs: the embedded world and its web corpus (world), and the tiny base
model pretrained on that corpus (tinymodel). The paper profile never imports this package."""
