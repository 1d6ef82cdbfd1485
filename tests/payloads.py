"""The example payloads of the published Activity API reference, copied verbatim.

Source: lexer-activity-api.txt (the reference as text). Each ``*_TEXT`` constant is the
example exactly as published (the users e-mail keeps its U+00A0 from the page's e-mail
obfuscation); the bytes constant without the suffix is what a server would send.
``USERS`` and ``EXPORT_COMPLETE`` are the two published examples that are not valid JSON
(``*_AS_PUBLISHED``), fixed minimally.
"""

from __future__ import annotations

# The request every report example was published for (series periods
# come without an offset and are read in this one).
REQUEST_DATE_FROM = "2018-04-01T00:00:00+11:00"
REQUEST_DATE_TO = "2018-04-30T23:59:59+11:00"
EXPORT_DATE_FROM = "2019-06-15T00:00:00+11:00"
EXPORT_DATE_TO = "2019-06-30T23:59:59+11:00"


# GET /v1/users example, verbatim: note the trailing comma after 789 (invalid JSON).
USERS_AS_PUBLISHED_TEXT = """{
    "id": 12345,
    "email": "[email\u00a0protected]",
    "first_name": "Jane",
    "last_name": "Remington",
    "timezone": "Australia/Sydney",
    "gmtoffset": 10,
    "sign_in_count": 76,
    "last_sign_in_at": "2018-03-21T06:09:01Z",
    "archived": false,
    "groups": [
      123,
      456,
      789,
    ]
  }"""
USERS_AS_PUBLISHED = USERS_AS_PUBLISHED_TEXT.encode("utf-8")

# GET /v1/groups example (a single object).
GROUPS_TEXT = """{
    "id": 123,
    "name": "Social Customer Care",
    "comment": "Social customer care team members"
  }"""
GROUPS = GROUPS_TEXT.encode("utf-8")

# GET /v1/forms example (a single object).
FORMS_TEXT = """{
    "id": 55,
    "name": "NPS Survey",
    "title": "Lexer NPS Survey",
    "archived": false,
    "created_at": "2018-05-26T21:54:19Z",
    "groups": [
      123
    ],
    "nps": true,
    "form_url": "https://d1z1wrkt4y2iqm.cloudfront.net/123455678899876543/1/form"
  }"""
FORMS = FORMS_TEXT.encode("utf-8")

# type summary.
SUMMARY_TEXT = """{
  "total_volume": 81,
  "avg_response_time": 181795.692883103,
  "avg_action_response_time": 167207.984987586,
  "total_responded_to": 29,
  "broke_sla": 11,
  "broke_action_sla": 10,
  "min_response_time": 34.090906,
  "median_response_time": 649.951914,
  "max_response_time": 1387160.862218,
  "min_action_response_time": 5.63089,
  "median_action_response_time": 96.865511,
  "max_action_response_time": 1387064.010109,
  "avg_action_response_time_min": 2786.7997497931,
  "avg_response_time_min": 3029.9282147183835,
  "median_action_response_time_min": 1.6144251833333334,
  "median_response_time_min": 10.8325319
}"""
SUMMARY = SUMMARY_TEXT.encode("utf-8")

# type states_volume.
STATES_VOLUME_TEXT = """{
  "closed": [
    {
      "state": "closed",
      "value": 174,
      "date_range": {
        "date_from": "2018-04-27 00:00"
      }
    },
    {
      "state": "closed",
      "value": 234,
      "date_range": {
        "date_from": "2018-04-28 00:00"
      }
    },
    {
      "state": "closed",
      "value": 255,
      "date_range": {
        "date_from": "2018-04-29 00:00"
      }
    },
    {
      "state": "closed",
      "value": 108,
      "date_range": {
        "date_from": "2018-04-30 00:00"
      }
    }
  ]
}"""
STATES_VOLUME = STATES_VOLUME_TEXT.encode("utf-8")

# The "Workflow States" example (published under type user_volume, like Team Volume).
WORKFLOW_STATES_TEXT = """[
  {
    "state": "closed",
    "volume": 92
  },
  {
    "state": "responded",
    "volume": 49
  },
  {
    "state": "assigned",
    "volume": 26
  },
  {
    "state": "in_progress",
    "volume": 13
  },
  {
    "state": "duplicate",
    "volume": 4
  },
  {
    "state": "awaiting_approval",
    "volume": 1
  }
]"""
WORKFLOW_STATES = WORKFLOW_STATES_TEXT.encode("utf-8")

# type classifications.
CLASSIFICATIONS_TEXT = """[
  {
    "classification_id": 123,
    "classification": "amusing",
    "state": "assigned",
    "volume": 2
  },
  {
    "classification_id": 123,
    "classification": "amusing",
    "state": "all_states",
    "volume": 3
  },
  {
    "classification_id": 123,
    "classification": "amusing",
    "state": "closed",
    "volume": 1
  },
  {
    "classification_id": 143,
    "classification": "customer service",
    "state": "responded",
    "volume": 1
  },
  {
    "classification_id": 143,
    "classification": "customer service",
    "state": "all_states",
    "volume": 1
  }
]"""
CLASSIFICATIONS = CLASSIFICATIONS_TEXT.encode("utf-8")

# type response_volume (the blank line is in the reference).
RESPONSE_VOLUME_TEXT = """{
  "avg_response_time": [

    {
      "value": 317691.388907962,
      "date_range": {
        "date_from": "2018-06-05 00:00"
      }
    },
    {
      "value": 31159.3797606667,
      "date_range": {
        "date_from": "2018-06-06 00:00"
      }
    },
    {
      "value": 69850.8753626667,
      "date_range": {
        "date_from": "2018-06-07 00:00"
      }
    },
    {
      "value": 10661.255474,
      "date_range": {
        "date_from": "2018-06-08 00:00"
      }
    }
  ]
}"""
RESPONSE_VOLUME = RESPONSE_VOLUME_TEXT.encode("utf-8")

# type user_summary (Team Summary): user_id is a string.
USER_SUMMARY_TEXT = """[
  {
    "first_name": "Jane",
    "last_name": "Pear",
    "mentions_assigned": 12,
    "user_id": "123",
    "responded_to": 9,
    "responded_to_in_private": 6,
    "avg_response_time": 17053.3492157778,
    "min_response_time": 56.983366,
    "max_response_time": 84664.420214,
    "avg_action_response_time": 278.770835555556,
    "min_action_response_time": 7.767898,
    "max_action_response_time": 2261.353394,
    "total_responded_to": 9,
    "broke_sla": 3,
    "broke_action_sla": 0,
    "avg_response_time_min": 284.22248692962995,
    "avg_action_response_time_min": 4.6461805925926,
    "fraction_responded_to": 0.75,
    "fraction_responded_to_in_private": 0.6666666666666666,
    "fraction_broke_sla": 0.3333333333333333,
    "fraction_broke_action_sla": 0.0
  },
  {
    "first_name": "Barry",
    "last_name": "Banana",
    "mentions_assigned": 7,
    "user_id": "789",
    "responded_to": 1,
    "responded_to_in_private": 1,
    "avg_response_time": 352842.64921,
    "min_response_time": 352842.64921,
    "max_response_time": 352842.64921,
    "avg_action_response_time": 134.51357,
    "min_action_response_time": 134.51357,
    "max_action_response_time": 134.51357,
    "total_responded_to": 1,
    "broke_sla": 1,
    "broke_action_sla": 0,
    "avg_response_time_min": 5880.710820166667,
    "avg_action_response_time_min": 2.241892833333333,
    "fraction_responded_to": 0.14285714285714285,
    "fraction_responded_to_in_private": 1.0,
    "fraction_broke_sla": 1.0,
    "fraction_broke_action_sla": 0.0
  }
]"""
USER_SUMMARY = USER_SUMMARY_TEXT.encode("utf-8")

# type user_volume (Team Volume): user_id is a number.
USER_VOLUME_TEXT = """[
  {
    "user_id": 123,
    "first_name": "Jane",
    "last_name": "Pear",
    "states": {
      "all_states": 166,
      "all_closed_states": 110,
      "new": 0,
      "assigned": 15,
      "in_progress": 14,
      "responded": 27,
      "awaiting_approval": 0,
      "redirected": 0,
      "irrelevant": 0,
      "duplicate": 0,
      "closed": 110,
      "no_response_required": 0
    }
  },
  {
    "user_id": 789,
    "first_name": "Barry",
    "last_name": "Banana",
    "states": {
      "all_states": 4,
      "all_closed_states": 1,
      "new": 0,
      "assigned": 1,
      "in_progress": 1,
      "responded": 1,
      "awaiting_approval": 0,
      "redirected": 0,
      "irrelevant": 0,
      "duplicate": 0,
      "closed": 1,
      "no_response_required": 0
    }
  }
]"""
USER_VOLUME = USER_VOLUME_TEXT.encode("utf-8")

# type case_summary.
CASE_SUMMARY_TEXT = """{
  "total_cases": 10,
  "first_reply_time": 305511.915624,
  "resolution_time": 427361.668069,
  "median_first_reply_time": 83991.86431,
  "median_resolution_time": 310362.299289,
  "agent_interactions": 2.4,
  "agents_involved": 1.0
}"""
CASE_SUMMARY = CASE_SUMMARY_TEXT.encode("utf-8")

# type case_volume.
CASE_VOLUME_TEXT = """{
  "open": [
    {
      "value": 9,
      "date_range": {
        "date_from": "2018-04-01 00:00"
      }
    },
    {
      "value": 9,
      "date_range": {
        "date_from": "2018-04-02 00:00"
      }
    },
    {
      "value": 9,
      "date_range": {
        "date_from": "2018-04-03 00:00"
      }
    },
    {
      "value": 9,
      "date_range": {
        "date_from": "2018-04-04 00:00"
      }
    },
    {
      "value": 9,
      "date_range": {
        "date_from": "2018-04-05 00:00"
      }
    },
    {
      "value": 10,
      "date_range": {
        "date_from": "2018-04-06 00:00"
      }
    },
    {
      "value": 9,
      "date_range": {
        "date_from": "2018-04-07 00:00"
      }
    }
  ]
}"""
CASE_VOLUME = CASE_VOLUME_TEXT.encode("utf-8")

# type case_classifications.
CASE_CLASSIFICATIONS_TEXT = """[
  {
    "classification_id": 466,
    "classification": "positive",
    "volume": 1
  },
  {
    "classification_id": 526,
    "classification": "social nps",
    "volume": 1
  },
  {
    "classification_id": 528,
    "classification": "feedback",
    "volume": 1
  },
  {
    "classification_id": 1246,
    "classification": "amusing",
    "volume": 1
  },
  {
    "classification_id": 1465,
    "classification": "image",
    "volume": 1
  },
  {
    "classification_id": 1467,
    "classification": "loyalty",
    "volume": 1
  },
  {
    "classification_id": 1472,
    "classification": "bot",
    "volume": 1
  }
]"""
CASE_CLASSIFICATIONS = CASE_CLASSIFICATIONS_TEXT.encode("utf-8")

# Answer to an export start (case_details, nps_submissions, mention_sla_export).
EXPORT_PENDING_TEXT = """{ "status": "pending", "url": null, "token": "<report_token>" }"""
EXPORT_PENDING = EXPORT_PENDING_TEXT.encode("utf-8")

# Status answer when complete, verbatim: the token lacks its closing quote.
EXPORT_COMPLETE_AS_PUBLISHED_TEXT = (
    """{ "status": "complete", "url": "<CSV File Location>", "token": "<report_token> }"""
)
EXPORT_COMPLETE_AS_PUBLISHED = EXPORT_COMPLETE_AS_PUBLISHED_TEXT.encode("utf-8")

# type nps_summary.
NPS_SUMMARY_TEXT = """{
  "total_sent": 16,
  "total_received": 12,
  "total_promoters": 9,
  "total_passives": 1,
  "total_detractors": 2,
  "nps_score": 58.333333333333336
}"""
NPS_SUMMARY = NPS_SUMMARY_TEXT.encode("utf-8")

# type nps_volume.
NPS_VOLUME_TEXT = """[
  {
    "date": "2018-04-01T13:00:00+00:00",
    "timestamp": 1522587600,
    "data": {
      "total_sent": 0,
      "total_received": 0,
      "total_promoters": 0,
      "total_passives": 0,
      "total_detractors": 0,
      "nps_score": 0.0
    }
  },
  {
    "date": "2018-04-02T13:00:00+00:00",
    "timestamp": 1522674000,
    "data": {
      "total_sent": 0,
      "total_received": 0,
      "total_promoters": 0,
      "total_passives": 0,
      "total_detractors": 0,
      "nps_score": 0.0
    }
  },
  {
    "date": "2018-04-03T13:00:00+00:00",
    "timestamp": 1522760400,
    "data": {
      "total_sent": 0,
      "total_received": 0,
      "total_promoters": 0,
      "total_passives": 0,
      "total_detractors": 0,
      "nps_score": 0.0
    }
  },
  {
    "date": "2018-04-04T13:00:00+00:00",
    "timestamp": 1522846800,
    "data": {
      "total_sent": 0,
      "total_received": 0,
      "total_promoters": 0,
      "total_passives": 0,
      "total_detractors": 0,
      "nps_score": 0.0
    }
  },
  {
    "date": "2018-04-05T13:00:00+00:00",
    "timestamp": 1522933200,
    "data": {
      "total_sent": 0,
      "total_received": 0,
      "total_promoters": 0,
      "total_passives": 0,
      "total_detractors": 0,
      "nps_score": 0.0
    }
  },
  {
    "date": "2018-04-06T13:00:00+00:00",
    "timestamp": 1523019600,
    "data": {
      "total_sent": 0,
      "total_received": 0,
      "total_promoters": 0,
      "total_passives": 0,
      "total_detractors": 0,
      "nps_score": 0.0
    }
  },
  {
    "date": "2018-04-07T13:00:00+00:00",
    "timestamp": 1523106000,
    "data": {
      "total_sent": 0,
      "total_received": 0,
      "total_promoters": 0,
      "total_passives": 0,
      "total_detractors": 0,
      "nps_score": 0.0
    }
  }
]"""
NPS_VOLUME = NPS_VOLUME_TEXT.encode("utf-8")

# Fixed: the users example without its trailing comma.
USERS_TEXT = USERS_AS_PUBLISHED_TEXT.replace("789,\n", "789\n")
USERS = USERS_TEXT.encode("utf-8")

# Fixed: the complete status answer with the token's closing quote restored.
EXPORT_COMPLETE_TEXT = EXPORT_COMPLETE_AS_PUBLISHED_TEXT.replace(
    '"<report_token> }', '"<report_token>" }'
)
EXPORT_COMPLETE = EXPORT_COMPLETE_TEXT.encode("utf-8")
