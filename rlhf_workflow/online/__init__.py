"""The online iterative loop: generate -> annotate -> select pairs -> DPO -> evaluate."""
