.PHONY: paper

# Regenerate every figure, table and number of the paper (running the conditions that are missing).
paper:
	python3 -m analyses
