"""Speculative decoding: a proposer guesses the next tokens of a running request, one step of
the target model scores them all, and rejection sampling keeps the longest prefix the target
agrees with plus one token of its own, so the output is distributed exactly as without it."""
