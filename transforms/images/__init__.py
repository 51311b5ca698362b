"""Images in: read the inputs (`sources`), fetch the bytes (`fetch`, behind the
address `guard`), decode them (`decode`)."""
