"""The reviewer service: the human review queue, the labelling page and the feedback topic.

Review requests from the moderator land in a prioritised Redis queue; reviewers claim items one at a time
(claims expire), label them on a small web page, and every label is published to the feedback topic for the
retraining job and kept in an audit log.
"""
