# Two entry points, each creating .venv and installing what it needs from nothing.
.PHONY: demo test bench

demo:  ## train an MLP on the UCI digits (the main job)
	bash ci/demo.sh

test:  ## the whole test suite, as CI runs it
	bash ci/test.sh

bench:  ## the CPU (and GPU, when present) benchmark suite, with a markdown report
	bash ci/bench.sh
