"""Everything that talks to the Hugging Face Hub or runs on it: whether it can be reached (connection), the account
behind a token and the Hub's errors in plain words (account), training on Jobs (jobs), publishing an adapter and its
card or a demo Space (publish, cards, space_template/), and, on a Space, where the studio runs and who may do what
(hosting, access). The engine submits Jobs through it, so it sits below the engine."""
