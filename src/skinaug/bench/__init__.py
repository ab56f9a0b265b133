"""Speed, set apart from the method: the reference implementations timed against ours and the study's
estimate from conf/'s paper profile (speed), and the GPU check (gpucheck). No stage imports it."""
