from tensormask_ray.cluster.argv import option_value


def test_option_value_reads_both_spellings_and_names_the_value_token():
    tokens = ["--config", "a.yaml", "--out=b", "--config=c.yaml", "--config"]
    assert option_value(tokens, 0, "--config") == ("a.yaml", 1)
    assert option_value(tokens, 2, "--out") == ("b", 2)
    assert option_value(tokens, 3, "--config") == ("c.yaml", 3)
    assert option_value(tokens, 4, "--config") == (None, -1)  # last token: no value
    assert option_value(tokens, 2, "--o") == (None, -1)  # a prefix is not the option
    assert option_value(["--out="], 0, "--out") == ("", 0)
