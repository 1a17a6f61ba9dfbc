"""The assembler stage (processors/): the pure rules, the Assembler, and real Faust workers."""
