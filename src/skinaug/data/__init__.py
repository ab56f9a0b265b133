"""The data: Fitzpatrick17k's metadata, the study subset and its images (fitzpatrick), the scenarios'
splits (splits), and a split's training set as the generator reads it (trainset). Imports nothing
above config."""
