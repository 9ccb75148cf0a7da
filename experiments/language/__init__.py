"""Language modelling on WikiText with a RevDEQ transformer (issue 3)."""
