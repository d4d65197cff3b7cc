"""Method parts (base.py): composable hooks at the loop's steps; one file per paper that needs more than a component."""
