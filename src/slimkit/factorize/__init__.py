"""Low-rank factorization: layers replaced by products of physically smaller layers."""
