"""The lab, beside the installed package: experiments, studies, probes, base training and their results.
It imports dopsd_core; dopsd_core never imports it, and the wheel holds none of it."""
