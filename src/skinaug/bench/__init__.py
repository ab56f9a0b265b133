"""Speed: the reference implementations timed against ours and the study's estimate (speed), and the GPU check (gpucheck)."""
