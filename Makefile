# Entry points, each creating .venv and installing what it needs from nothing.
.PHONY: demo test bench docs

demo:  ## train an MLP on the UCI digits (the main job)
	bash ci/demo.sh

test:  ## the whole test suite, as CI runs it
	bash ci/test.sh

bench:  ## the CPU (and GPU, when present) benchmark suite, with a markdown report
	bash ci/bench.sh

# Sphinx (docs/conf.py): warnings are errors and every reference is checked (-n); ci/test.sh
# runs the same build. tests/test_docs.py runs the pages' examples.
docs:  ## the documentation site (docs/) into build/docs/html
	bash -c 'set -euo pipefail; source ci/venv.sh docs; rm -rf build/docs; \
	  "$$VENV/bin/python" -m sphinx -W --keep-going -n -E -q -b html docs build/docs/html'
	@echo "open build/docs/html/index.html"
