"""The data: Fitzpatrick17k's metadata, the study subset and its images (fitzpatrick), the scenarios' splits (splits)."""
